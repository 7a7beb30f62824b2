"""The 80 COCO detection categories: their ids (1..90, with gaps) and names."""

from __future__ import annotations

_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant - stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe - backpack umbrella - - "
    "handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
    "surfboard tennis_racket bottle - wine_glass cup fork knife spoon bowl banana apple sandwich orange "
    "broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed - dining_table - - toilet - tv "
    "laptop mouse remote keyboard cell_phone microwave oven toaster sink refrigerator - book clock vase "
    "scissors teddy_bear hair_drier toothbrush"
)
# Id i is word i - 1; "-" marks the ids COCO reserved but never used.
COCO_NAMES: dict[int, str] = {
    i: word.replace("_", " ") for i, word in enumerate(_NAMES.split(), start=1) if word != "-"
}
COCO_IDS: list[int] = sorted(COCO_NAMES)
