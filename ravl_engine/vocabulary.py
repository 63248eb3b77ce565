"""The built-in naming vocabulary: object names, colours x shapes, and the artefacts spurious features often are."""

from __future__ import annotations

# the 80 COCO object categories
COCO = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip

# more everyday objects and scene parts, in the spirit of LVIS's long tail
OBJECTS = (
    "tree", "grass", "sky", "water", "sand", "snow", "road", "building", "wall", "floor", "window", "door",
    "fence", "sign", "flag", "lamp", "pole", "bridge", "mountain", "rock", "cloud", "flower", "leaf", "bush",
    "shadow", "hand", "face", "hair", "eye", "shirt", "hat", "glasses", "shoe", "jacket", "helmet", "mask",
    "bag", "box", "basket", "bucket", "can", "jar", "plate", "tray", "napkin", "towel", "pillow", "blanket",
    "curtain", "carpet", "shelf", "cabinet", "drawer", "desk", "table", "stool", "mirror", "painting", "poster",
    "picture frame", "screen", "monitor", "camera", "phone", "cable", "wire", "battery", "bulb", "candle",
    "rope", "chain", "wheel", "tire", "seat", "steering wheel", "license plate", "headlight", "boat deck",
    "ball", "toy", "doll", "balloon", "paper", "card", "envelope", "pen", "pencil", "marker pen", "tape",
    "bottle cap", "straw", "glass", "mug", "teapot", "pan", "pot", "lid", "bread", "cheese", "egg", "meat",
    "fish", "fruit", "vegetable", "tomato", "lemon", "grape", "strawberry", "corn", "potato", "mushroom",
    "insect", "butterfly", "spider", "duck", "chicken", "pig", "goat", "deer", "monkey", "lion", "tiger",
    "rabbit", "mouse animal", "squirrel", "fox", "wolf", "turtle", "snake", "frog", "whale", "dolphin",
    "skin", "mole", "bandage", "stethoscope", "syringe", "medical tube", "chest drain", "pacemaker", "electrode",
    "bone", "metal implant", "surgical clip", "gauze", "glove", "microscope slide", "stain", "bubble",
)  # fmt: skip

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white", "black", "orange", "purple", "gray")
SHAPES = ("square", "circle", "disk", "ring", "triangle", "stripes", "dot", "line", "cross", "star")

# image artefacts and markings that often become shortcuts
ARTEFACTS = (
    "text", "watermark", "ruler", "border", "stripes", "logo", "timestamp", "date stamp", "caption", "label",
    "letters", "numbers", "digit", "handwriting", "scale bar", "arrow", "marker", "circle marking", "sticker",
    "frame", "black border", "white border", "black corner", "vignette", "blur", "noise", "grain", "glare",
    "reflection", "lens flare", "overexposure", "dark image", "bright image", "low contrast", "compression artefact",
    "pixelation", "grid", "checkerboard", "gradient", "solid colour", "blank background", "black background",
    "white background", "empty region", "hospital tag", "laterality marker", "dermoscopy ring", "hair on skin",
    "ink marking", "barcode", "qr code", "copyright notice", "brand name", "price tag", "screen bezel",
)  # fmt: skip


def builtin_vocabulary() -> list[str]:
    """Every built-in phrase once, in a fixed order: COCO names, other objects, colour x shape, artefacts."""
    phrases = [*COCO, *OBJECTS, *(f"{c} {s}" for c in COLOURS for s in SHAPES), *COLOURS, *SHAPES, *ARTEFACTS]
    return list(dict.fromkeys(phrases))
