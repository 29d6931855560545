"""Colour palettes and class names of the datasets, for drawing predicted label maps.

* Cityscapes: the 19 train ids with the names and colours of `cityscapesscripts.helpers.labels`, the
  dataset's own definition (the same table `repro.engine.data.cityscapes` maps label ids with).
* PASCAL VOC 2012: the 21 classes (background first) and the VOC devkit's colour map, whose colour for
  label l interleaves l's bits into the high bits of R, G and B (`VOClabelcolormap.m` in the VOC2012
  development kit, http://host.robots.ox.ac.uk/pascal/VOC/voc2012/). It is also the palette of the dataset's
  own `SegmentationClass` PNGs, so predictions and ground truth look the same.
* ADE20K (SceneParsing, 150 classes, label k - 1 for stored k): names and colours as mmsegmentation's
  `ADE20KDataset.METAINFO` lists them
  (https://github.com/open-mmlab/mmsegmentation/blob/main/mmseg/datasets/ade.py). This is data, kept below
  as one "RRGGBB name" line per class; two classes (road, skyscraper) share the colour 8c8c8c there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DATASETS = ("cityscapes", "voc", "ade20k")

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# mmsegmentation's ADE20K classes and palette (see the module docstring), class 0 first.
_ADE20K_TABLE = """
787878 wall
b47878 building
06e6e6 sky
503232 floor
04c803 tree
787850 ceiling
8c8c8c road
cc05ff bed
e6e6e6 windowpane
04fa07 grass
e005ff cabinet
ebff07 sidewalk
96053d person
787846 earth
08ff33 door
ff0652 table
8fff8c mountain
ccff04 plant
ff3307 curtain
cc4603 chair
0066c8 car
3de6fa water
ff0633 painting
0b66ff sofa
ff0747 shelf
ff09e0 house
0907e6 sea
dcdcdc mirror
ff095c rug
7009ff field
08ffd6 armchair
07ffe0 seat
ffb806 fence
0aff47 desk
ff290a rock
07ffff wardrobe
e0ff08 lamp
6608ff bathtub
ff3d06 railing
ffc207 cushion
ff7a08 base
00ff14 box
ff0829 column
ff0599 signboard
0633ff chest of drawers
eb0cff counter
a09614 sand
00a3ff sink
8c8c8c skyscraper
fa0a0f fireplace
14ff00 refrigerator
1fff00 grandstand
ff1f00 path
ffe000 stairs
99ff00 runway
0000ff case
ff4700 pool table
00ebff pillow
00adff screen door
1f00ff stairway
0bc8c8 river
ff5200 bridge
00fff5 bookcase
003dff blind
00ff70 coffee table
00ff85 toilet
ff0000 flower
ffa300 book
ff6600 hill
c2ff00 bench
008fff countertop
33ff00 stove
0052ff palm
00ff29 kitchen island
00ffad computer
0a00ff swivel chair
adff00 boat
00ff99 bar
ff5c00 arcade machine
ff00ff hovel
ff00f5 bus
ff0066 towel
ffad00 light
ff0014 truck
ffb8b8 tower
001fff chandelier
00ff3d awning
0047ff streetlight
ff00cc booth
00ffc2 television receiver
00ff52 airplane
000aff dirt track
0070ff apparel
3300ff pole
00c2ff land
007aff bannister
00ffa3 escalator
ff9900 ottoman
00ff0a bottle
ff7000 buffet
8fff00 poster
5200ff stage
a3ff00 van
ffeb00 ship
08b8aa fountain
8500ff conveyer belt
00ff5c canopy
b800ff washer
ff001f plaything
00b8ff swimming pool
00d6ff stool
ff0070 barrel
5cff00 basket
00e0ff waterfall
70e0ff tent
46b8a0 bag
a300ff minibike
9900ff cradle
47ff00 oven
ff00a3 ball
ffcc00 food
ff008f step
00ffeb tank
85ff00 trade name
ff00eb microwave
f500ff pot
ff007a animal
fff500 bicycle
0abed4 lake
d6ff00 dishwasher
00ccff screen
1400ff blanket
ffff00 sculpture
0099ff hood
0029ff sconce
00ffcc vase
2900ff traffic light
29ff00 tray
ad00ff ashcan
00f5ff fan
4700ff pier
7a00ff crt screen
00ffb8 plate
005cff monitor
b8ff00 bulletin board
0085ff shower
ffd600 radiator
19c2c2 glass
66ff00 clock
5c00ff flag
"""


@dataclass(frozen=True)
class Palette:
    """Class names and colours: `colours[i]` (uint8 RGB) draws class i, `names[i]` names it."""

    dataset: str
    names: tuple[str, ...]
    colours: np.ndarray

    def __post_init__(self) -> None:
        if self.colours.shape != (len(self.names), 3) or self.colours.dtype != np.uint8:
            raise ValueError(
                f"{self.dataset}: colours must be ({len(self.names)}, 3) uint8, got "
                f"{self.colours.shape} {self.colours.dtype}"
            )
        if not 1 <= len(self.names) <= 256:
            raise ValueError(f"{self.dataset}: a PNG palette holds 1..256 classes, got {len(self.names)}")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def png_palette(self) -> list[int]:
        """The 768 values of a "P" mode PNG palette: the class colours, then black."""
        flat = np.zeros((256, 3), dtype=np.uint8)
        flat[: self.num_classes] = self.colours
        return flat.flatten().tolist()

    def colourise(self, labels: np.ndarray) -> np.ndarray:
        """(H, W) class ids -> (H, W, 3) uint8 RGB; raises ValueError on an id outside the palette."""
        labels = np.asarray(labels)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"label values must be in [0, {self.num_classes}) for the {self.dataset} palette, "
                f"got [{labels.min()}, {labels.max()}]"
            )
        return self.colours[labels]


def voc_colour_map(count: int = 256) -> np.ndarray:
    """(count, 3) uint8: the PASCAL VOC devkit colour map (bit b of the label goes to bit 7 - b // 3 of R, G
    or B, in turn)."""
    colours = np.zeros((count, 3), dtype=np.uint8)
    for label in range(count):
        value, shift, rgb = label, 7, [0, 0, 0]
        while value:
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
        colours[label] = rgb
    return colours


def cityscapes_palette() -> Palette:
    from cityscapesscripts.helpers.labels import labels

    by_train_id = {label.trainId: label for label in labels if 0 <= label.trainId < 255}
    if sorted(by_train_id) != list(range(19)):
        raise ValueError(f"cityscapesscripts' label table gives train ids {sorted(by_train_id)}, expected 0..18")
    ordered = [by_train_id[train_id] for train_id in range(19)]
    return Palette(
        "cityscapes",
        tuple(label.name for label in ordered),
        np.array([label.color for label in ordered], dtype=np.uint8),
    )


def voc_palette() -> Palette:
    return Palette("voc", VOC_CLASSES, voc_colour_map(len(VOC_CLASSES)))


def ade20k_palette() -> Palette:
    rows = [line.split(" ", 1) for line in _ADE20K_TABLE.strip().splitlines()]
    colours = np.array([[int(code[i : i + 2], 16) for i in (0, 2, 4)] for code, _ in rows], dtype=np.uint8)
    return Palette("ade20k", tuple(name for _, name in rows), colours)


def palette_for(dataset: str) -> Palette:
    """The palette of `dataset` ("cityscapes", "voc", "ade20k")."""
    makers = {"cityscapes": cityscapes_palette, "voc": voc_palette, "ade20k": ade20k_palette}
    if dataset not in makers:
        raise ValueError(f"no palette for dataset {dataset!r}; expected one of {DATASETS}")
    return makers[dataset]()
