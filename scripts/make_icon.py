"""Draw the SemiSupSeg icons (module and extension, 128x128 PNG) with Qt's QPainter.

    QT_QPA_PLATFORM=offscreen .venv/bin/python scripts/make_icon.py

The picture: a volume slice with a solid (labeled) segment on the left and a dashed
pseudo-mask over a warm uncertainty glow on the right: label a few, learn from the rest.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QPointF, QRectF, Qt  # noqa: E402
from PySide6.QtGui import (  # noqa: E402
    QBrush,
    QColor,
    QGuiApplication,
    QImage,
    QPainter,
    QPainterPath,
    QPen,
    QRadialGradient,
)

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = [
    REPO / "SemiSupSeg" / "Resources" / "Icons" / "SemiSupSeg.png",
    REPO / "Resources" / "SemiSupSeg.png",
]
SIZE = 128


def organ(cx: float, cy: float, scale: float) -> QPainterPath:
    """A smooth kidney-like blob."""
    path = QPainterPath()
    path.moveTo(cx - 22 * scale, cy - 4 * scale)
    path.cubicTo(
        cx - 24 * scale,
        cy - 30 * scale,
        cx + 6 * scale,
        cy - 34 * scale,
        cx + 14 * scale,
        cy - 18 * scale,
    )
    path.cubicTo(
        cx + 22 * scale,
        cy - 4 * scale,
        cx + 8 * scale,
        cy + 2 * scale,
        cx + 16 * scale,
        cy + 14 * scale,
    )
    path.cubicTo(
        cx + 22 * scale,
        cy + 28 * scale,
        cx - 6 * scale,
        cy + 34 * scale,
        cx - 16 * scale,
        cy + 20 * scale,
    )
    path.cubicTo(
        cx - 24 * scale,
        cy + 10 * scale,
        cx - 21 * scale,
        cy + 4 * scale,
        cx - 22 * scale,
        cy - 4 * scale,
    )
    path.closeSubpath()
    return path


def draw() -> QImage:
    image = QImage(SIZE, SIZE, QImage.Format_ARGB32)
    image.fill(Qt.transparent)
    p = QPainter(image)
    p.setRenderHint(QPainter.Antialiasing)

    # background tile: a dark slice with a faint grid (the volume)
    tile = QRectF(4, 4, SIZE - 8, SIZE - 8)
    p.setPen(Qt.NoPen)
    p.setBrush(QColor("#1d2733"))
    p.drawRoundedRect(tile, 22, 22)
    p.setPen(QPen(QColor(255, 255, 255, 22), 1))
    for x in range(20, SIZE - 12, 12):
        p.drawLine(QPointF(x, 12), QPointF(x, SIZE - 12))
        p.drawLine(QPointF(12, x), QPointF(SIZE - 12, x))

    # left: a labeled case, solid segment
    p.setPen(QPen(QColor("#e8f6f3"), 2.5))
    p.setBrush(QColor("#1abc9c"))
    p.drawPath(organ(38, 64, 0.95))

    # right: an unlabeled case, uncertainty glow (Inferno-like) under a dashed pseudo-mask
    glow = QRadialGradient(QPointF(94, 56), 34)
    glow.setColorAt(0.0, QColor(252, 255, 164, 235))
    glow.setColorAt(0.35, QColor(249, 142, 9, 200))
    glow.setColorAt(0.7, QColor(188, 55, 84, 120))
    glow.setColorAt(1.0, QColor(66, 10, 104, 0))
    p.setPen(Qt.NoPen)
    p.setBrush(QBrush(glow))
    p.drawEllipse(QPointF(94, 56), 34, 34)
    pen = QPen(QColor("#ffffff"), 3)
    pen.setStyle(Qt.DashLine)
    p.setPen(pen)
    p.setBrush(Qt.NoBrush)
    p.drawPath(organ(92, 64, 0.95))

    # arrow: what is learned from the left is carried to the right
    p.setPen(QPen(QColor("#f1c40f"), 4, Qt.SolidLine, Qt.RoundCap, Qt.RoundJoin))
    p.drawLine(QPointF(52, 104), QPointF(76, 104))
    arrow = QPainterPath()
    arrow.moveTo(70, 97)
    arrow.lineTo(78, 104)
    arrow.lineTo(70, 111)
    p.drawPath(arrow)
    p.end()
    return image


def main() -> int:
    app = QGuiApplication.instance() or QGuiApplication(sys.argv)
    image = draw()
    for path in OUTPUTS:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not image.save(str(path), "PNG"):
            print(f"could not write {path}", file=sys.stderr)
            return 1
        print(f"wrote {path}")
    del app
    return 0


if __name__ == "__main__":
    sys.exit(main())
