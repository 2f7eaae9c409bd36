"""SemiSupSeg: semi-supervised 3D segmentation for 3D Slicer (Slicer-side code and the backend)."""

__version__ = "0.1.0"
