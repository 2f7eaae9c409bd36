"""The training and prediction backend: runs in its own process; torch, MONAI, timm, SimpleITK."""
