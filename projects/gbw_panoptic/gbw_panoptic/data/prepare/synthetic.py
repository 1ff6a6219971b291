"""The synthetic two-domain street-scene benchmark (``datasets/prepare_synthetic.py``).

Each image is a procedurally generated street scene: a list of labelled polygons (sky, buildings,
vegetation, sidewalk, terrain, road, wall, fence, poles with traffic lights and signs, cars, buses,
persons, riders on motorcycles and bicycles) drawn in painter's order, far objects first. The polygon
list is rasterised with cityscapesScripts' own ``createLabelImage`` / ``createInstanceImage``, so the
label images and the polygon JSONs agree exactly with what the Cityscapes converters produce.

Two domains with one class palette and a gap in rendering and layout (an appearance shift that
self-training can bridge, as between a game engine and a camera):

- **source** (SYNTHIA-RAND-CITYSCAPES layout, ``train`` plus a held-out ``source_val`` folder):
  saturated flat rendering, sharp edges, little noise, random camera pitch (horizon anywhere in
  25-60 % of the height), many pedestrians and riders, few cars, no terrain;
- **target** (Cityscapes layout, ``train`` and ``val``): the palette desaturated and tinted blue,
  texture (facade windows, road grain), a per-image colour cast, vignetting, Gaussian blur and sensor
  noise, a fixed camera (horizon at 40-48 %), many cars, few riders, grass median strips (terrain).

Thin structures (poles, lights, signs; at least 3 px wide) and riders/two-wheelers stay around or
below 1 % of the pixels, so the class imbalance resembles Cityscapes; ``--rare-frequency`` makes the
rare classes of the target train split rarer still. Everything is drawn from
``numpy.random.default_rng`` seeded with ``(seed, domain, split, index)``, and which rare objects are
kept from a stream spawned from the same seed: the output does not depend on the number of workers.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.helpers.labels import name2label
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from cityscapesscripts.preparation.json2labelImg import createLabelImage
from tqdm import tqdm

from ...utils.io import atomic_path, write_json
from ...utils.parallel import parallel_map
from ..datasets.builtin_meta import SYNTHIA_TO_LABEL_ID
from .conversion import (
    ConversionReport,
    conversion_parser,
    data_file_error,
    exit_code_on_missing_input,
    print_report,
    save_png,
)
from .cityscapes import prepare_cityscapes
from .synthia import prepare_synthia

__all__ = [
    "DEFAULT_SIZES",
    "RARE_TARGET_CLASSES",
    "PALETTE",
    "DomainStyle",
    "SOURCE_STYLE",
    "TARGET_STYLE",
    "generate_scene",
    "rasterise",
    "instance_offsets",
    "render_image",
    "rare_objects_kept",
    "generate_synthetic",
    "prepare_synthetic",
    "main",
]

Polygon = List[List[int]]
SceneObject = Tuple[str, Polygon]  # (Cityscapes label name, polygon [[x, y], ...])

# The classes under 1 % of the target train pixels (datasets/README.md, class frequencies at the default
# size): the rare classes of the experiment report, whose frequency ``--rare-frequency`` scales. A
# two-wheeler is kept or dropped with its rider.
RARE_TARGET_CLASSES = ("wall", "traffic light", "traffic sign", "terrain", "rider", "motorcycle", "bicycle")
TWO_WHEELERS = ("motorcycle", "bicycle")

TARGET_TRAIN_CITIES = ("ashford", "brookdale")
TARGET_VAL_CITIES = ("cedarton",)


@dataclass(frozen=True)
class DomainStyle:
    """Scene statistics and appearance of one domain.

    Attributes:
        palette: RGB colour (0-255) of each label name drawn.
        horizon: range of the horizon row as a fraction of the image height.
        cars, persons, riders, buses, poles: ranges ``(low, high)`` of the number of objects (high
            inclusive); ``buses`` and ``riders`` may be 0.
        terrain_probability: probability of a grass median strip on the road.
        saturation: factor applied to the palette's distance from grey.
        instance_variation: range (0-255 units, +-) of the random colour offset of each thing instance.
        texture: amplitude (0-255 units) of the low-frequency texture per class.
        windows: draw facade window patterns on buildings.
        tint: fixed multiplicative RGB factors of the domain (its white balance).
        colour_cast: multiplicative RGB cast range drawn per image and channel; ``vignetting``: darkening of the corners (0-1).
        blur_sigma: Gaussian blur in pixels (0 = none); ``noise_sigma``: sensor noise, 0-255 units.
    """

    palette: Dict[str, Tuple[int, int, int]]
    horizon: Tuple[float, float]
    cars: Tuple[int, int]
    persons: Tuple[int, int]
    riders: Tuple[int, int]
    buses: Tuple[int, int]
    poles: Tuple[int, int]
    terrain_probability: float
    saturation: float
    instance_variation: float
    texture: float
    windows: bool
    tint: Tuple[float, float, float]
    colour_cast: Tuple[float, float]
    vignetting: float
    blur_sigma: float
    noise_sigma: float


# One class palette for both domains (roads are grey and trees green in either): the domains differ
# in how the scenes are rendered and laid out, a gap that self-training can bridge.
PALETTE = {
    "sky": (120, 170, 235), "building": (150, 110, 90), "vegetation": (60, 160, 50),
    "sidewalk": (200, 190, 170), "terrain": (140, 170, 80), "road": (90, 90, 100),
    "wall": (190, 170, 120), "fence": (120, 80, 50), "pole": (220, 220, 40),
    "traffic light": (30, 30, 30), "traffic sign": (240, 240, 240), "car": (200, 40, 40),
    "bus": (240, 170, 20), "person": (250, 130, 90), "rider": (60, 60, 220),
    "motorcycle": (200, 40, 200), "bicycle": (30, 160, 200),
}

SOURCE_STYLE = DomainStyle(
    palette=PALETTE,
    horizon=(0.25, 0.6), cars=(1, 4), persons=(6, 14), riders=(1, 4), buses=(0, 1), poles=(2, 5),
    terrain_probability=0.0, saturation=1.3, instance_variation=30.0, texture=6.0, windows=False,
    tint=(1.0, 1.0, 1.0), colour_cast=(1.0, 1.0), vignetting=0.0, blur_sigma=0.0, noise_sigma=2.0,
)

TARGET_STYLE = DomainStyle(
    palette=PALETTE,
    horizon=(0.40, 0.48), cars=(4, 10), persons=(2, 6), riders=(1, 3), buses=(0, 1), poles=(2, 6),
    terrain_probability=0.85, saturation=0.6, instance_variation=30.0, texture=14.0, windows=True,
    tint=(0.85, 0.95, 1.15), colour_cast=(0.9, 1.1), vignetting=0.3, blur_sigma=1.0, noise_sigma=6.0,
)


def _rect(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    return [[int(round(x0)), int(round(y0))], [int(round(x1)), int(round(y0))],
            [int(round(x1)), int(round(y1))], [int(round(x0)), int(round(y1))]]


def _blob(
    rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float, vertices: int = 12
) -> Polygon:
    """Irregular convex-ish polygon (tree crown, sign) around ``(cx, cy)`` with radii ``rx, ry``."""
    angles = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    radii = rng.uniform(0.75, 1.0, size=vertices)
    return [
        [int(round(cx + rx * r * np.cos(a))), int(round(cy + ry * r * np.sin(a)))]
        for a, r in zip(angles, radii)
    ]


def _person(x: float, ground: float, height: float) -> Polygon:
    """Silhouette (head, shoulders, legs) standing on ``ground`` at column ``x``."""
    w = height * 0.28
    points = [(0.0, 0.0), (0.12, 0.0), (0.18, -0.45), (0.25, -0.52), (0.22, -0.8), (0.08, -0.86),
              (0.1, -1.0), (-0.1, -1.0), (-0.08, -0.86), (-0.22, -0.8), (-0.25, -0.52), (-0.18, -0.45),
              (-0.12, 0.0), (-0.02, 0.0), (0.0, -0.4)]
    return [[int(round(x + px * w / 0.5)), int(round(ground + py * height))] for px, py in points]


def _car(x: float, ground: float, width: float, height: float) -> Polygon:
    points = [(-0.5, 0.0), (0.5, 0.0), (0.5, -0.5), (0.3, -0.55), (0.18, -1.0), (-0.22, -1.0),
              (-0.35, -0.55), (-0.5, -0.5)]
    return [[int(round(x + px * width)), int(round(ground + py * height))] for px, py in points]


def _two_wheeler(x: float, ground: float, length: float) -> Polygon:
    points = [(-0.5, 0.0), (-0.3, -0.05), (0.3, -0.05), (0.5, 0.0), (0.45, -0.35), (0.1, -0.45),
              (-0.2, -0.4), (-0.5, -0.3)]
    return [[int(round(x + px * length)), int(round(ground + py * length))] for px, py in points]


def generate_scene(
    rng: np.random.Generator, style: DomainStyle, height: int, width: int
) -> List[SceneObject]:
    """Draw the polygons of one street scene, in painter's order (later objects occlude earlier ones).

    Returns:
        ``[(label_name, polygon)]`` with Cityscapes label names and integer pixel coordinates.
    """
    H, W = height, width
    horizon = rng.uniform(*style.horizon) * H
    vanishing_x = rng.uniform(0.35, 0.65) * W
    objects: List[SceneObject] = [("sky", _rect(0, 0, W, horizon + 1))]

    # Facades along the horizon, with gaps showing sky or trees.
    x = -rng.uniform(0, 0.1) * W
    while x < W:
        facade_width = rng.uniform(0.08, 0.25) * W
        if rng.random() < 0.85:
            top = horizon - rng.uniform(0.1, 0.45) * H
            objects.append(("building", _rect(x, max(top, 0), x + facade_width, horizon + 2)))
        x += facade_width
    for _ in range(rng.integers(1, 5)):
        cx, r = rng.uniform(0, W), rng.uniform(0.04, 0.12) * W
        objects.append(("vegetation", _blob(rng, cx, horizon - r * 0.6, r, r * 0.9)))

    # Ground: sidewalk everywhere below the horizon, the road, a grass median strip on the road.
    objects.append(("sidewalk", _rect(0, horizon, W, H)))
    road_half_top = rng.uniform(0.02, 0.06) * W
    left_bottom, right_bottom = rng.uniform(-0.3, 0.15) * W, rng.uniform(0.85, 1.3) * W
    road = [
        [int(left_bottom), H],
        [int(right_bottom), H],
        [int(vanishing_x + road_half_top), int(horizon)],
        [int(vanishing_x - road_half_top), int(horizon)],
    ]
    objects.append(("road", road))
    if rng.random() < style.terrain_probability:
        # Along the road's centre line from the horizon to a random depth, a fixed fraction of the
        # road's width: near the middle of the image, where random crops see it as often as the road.
        end_depth, fraction = rng.uniform(0.4, 1.0), rng.uniform(0.08, 0.15)
        median = []
        for depth, side in ((0.0, -1), (end_depth, -1), (end_depth, 1), (0.0, 1)):
            centre = vanishing_x + depth * ((left_bottom + right_bottom) / 2 - vanishing_x)
            half_width = road_half_top + depth * ((right_bottom - left_bottom) / 2 - road_half_top)
            median.append([int(round(centre + side * fraction * half_width)),
                           int(round(horizon + depth * (H - horizon)))])
        objects.append(("terrain", median))

    # Wall and fence segments at the back of the sidewalk.
    for label in ("wall", "fence"):
        if rng.random() < 0.7:
            x0 = rng.uniform(0, 0.8) * W
            x1 = x0 + rng.uniform(0.1, 0.3) * W
            segment_height = rng.uniform(0.03, 0.08) * H
            objects.append((label, _rect(x0, horizon - segment_height, x1, horizon + 0.02 * H)))

    def ground_row(depth: float) -> float:
        """Image row of a ground point at relative depth (0 = horizon, 1 = bottom row)."""
        return horizon + depth * (H - horizon)

    # Things and poles, sorted far to near.
    things: List[Tuple[float, List[SceneObject]]] = []

    def road_x(ground: float) -> Tuple[float, float]:
        t = (ground - horizon) / max(H - horizon, 1)
        left = vanishing_x - road_half_top + t * (left_bottom - vanishing_x + road_half_top)
        right = vanishing_x + road_half_top + t * (right_bottom - vanishing_x - road_half_top)
        return left, right

    for _ in range(rng.integers(style.poles[0], style.poles[1] + 1)):
        depth = rng.uniform(0.05, 0.6)
        ground = ground_row(depth)
        left, right = road_x(ground)
        x = left - rng.uniform(0.02, 0.1) * W if rng.random() < 0.5 else right + rng.uniform(0.02, 0.1) * W
        pole_height = (0.3 + 0.6 * depth) * H * 0.8
        pole_width = max(3.0, 0.025 * H * (0.3 + depth))
        top = ground - pole_height
        parts = [("pole", _rect(x - pole_width / 2, top, x + pole_width / 2, ground))]
        box = pole_width * 2.5
        if rng.random() < 0.5:
            parts.append(("traffic light", _rect(x - box / 2, top - 2.2 * box, x + box / 2, top)))
        else:
            parts.append(("traffic sign", _blob(rng, x, top - box, box * 1.2, box * 1.2, vertices=6)))
        things.append((ground, parts))

    def add_on_road(count: Tuple[int, int], build, min_depth: float = 0.08) -> None:
        for _ in range(rng.integers(count[0], count[1] + 1)):
            depth = rng.uniform(min_depth, 1.0)
            ground = ground_row(depth)
            left, right = road_x(ground)
            things.append((ground, build(rng.uniform(left, right), ground, 0.1 + depth)))

    add_on_road(style.cars, lambda x, g, s: [("car", _car(x, g, 0.3 * W * s, 0.16 * W * s))])
    add_on_road(style.buses, lambda x, g, s: [("bus", _car(x, g, 0.4 * W * s, 0.25 * W * s))])

    def rider(x: float, ground: float, scale: float) -> List[SceneObject]:
        length = 0.12 * W * scale
        vehicle = "motorcycle" if rng.random() < 0.5 else "bicycle"
        return [("rider", _person(x, ground - 0.3 * length, 0.25 * H * scale)),
                (vehicle, _two_wheeler(x, ground, length))]

    # Riders and pedestrians no further than a quarter of the ground depth: farther ones would be a
    # few pixels tall at 128x256, too small to learn in the benchmark's iterations.
    add_on_road(style.riders, rider, min_depth=0.3)
    for _ in range(rng.integers(style.persons[0], style.persons[1] + 1)):
        depth = rng.uniform(0.25, 1.0)
        ground = ground_row(depth)
        left, right = road_x(ground)
        # Half on the sidewalks, half crossing the road: persons are not only at the image sides,
        # which random crops of the image see less often.
        side = rng.random()
        if side < 0.25:
            x = rng.uniform(0, max(left, 1))
        elif side < 0.5:
            x = rng.uniform(min(right, W - 1), W)
        else:
            x = rng.uniform(max(left, 0), min(right, W))
        things.append((ground, [("person", _person(x, ground, 0.3 * H * (0.1 + depth)))]))

    things.sort(key=lambda item: item[0])
    for _, parts in things:
        objects.extend(parts)
    return objects


def rasterise(objects: Sequence[SceneObject], height: int, width: int) -> Tuple[dict, np.ndarray, np.ndarray]:
    """Polygons JSON (Cityscapes ``*_gtFine_polygons.json`` content) and its label / instance images.

    Returns:
        ``(polygons_json, label_ids, instance_ids)``: label ids HxW uint8 and instance ids HxW int32
        (``labelId`` or ``labelId * 1000 + k``), exactly as cityscapesScripts rasterises the JSON.
    """
    polygons_json = {
        "imgHeight": height,
        "imgWidth": width,
        "objects": [{"label": label, "polygon": polygon} for label, polygon in objects],
    }
    annotation = Annotation()
    annotation.fromJsonText(json.dumps(polygons_json))
    label_ids = np.asarray(createLabelImage(annotation, "ids"), dtype=np.uint8)
    instance_ids = np.asarray(createInstanceImage(annotation, "ids"), dtype=np.int32)
    return polygons_json, label_ids, instance_ids


def _visible_instances(instance_ids: np.ndarray) -> np.ndarray:
    """The thing instance ids (``>= 1000``) that cover at least one pixel of ``instance_ids``, ascending."""
    instances = np.flatnonzero(np.bincount(instance_ids.ravel()))
    return instances[instances >= 1000]


def instance_offsets(rng: np.random.Generator, style: DomainStyle, instance_ids: np.ndarray) -> np.ndarray:
    """Random RGB colour offset (0-255 units, within ``±style.instance_variation``) of every thing instance
    visible in ``instance_ids`` (HxW), drawn in ascending id order: ``(max id + 1) x 3`` float32, indexed by
    instance id (0 for the others)."""
    instances = _visible_instances(instance_ids)
    offsets = np.zeros((instance_ids.max() + 1, 3), dtype=np.float32)
    offsets[instances] = rng.uniform(-style.instance_variation, style.instance_variation, size=(len(instances), 3))
    return offsets


def render_image(
    rng: np.random.Generator,
    style: DomainStyle,
    label_ids: np.ndarray,
    instance_ids: np.ndarray,
    offsets: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Render the RGB image (HxWx3 uint8) of a scene from its label and instance images; ``offsets``: the
    instances' colour offsets indexed by instance id (:func:`instance_offsets`; drawn from ``rng`` when None)."""
    H, W = label_ids.shape
    palette = np.zeros((256, 3), dtype=np.float32)
    for name, colour in style.palette.items():
        palette[name2label[name].id] = colour
    grey = palette.mean(axis=1, keepdims=True)
    palette = np.clip(grey + style.saturation * (palette - grey), 0, 255)
    image = palette[label_ids]

    # Per-instance colour variation (cars of all colours, clothing).
    if offsets is None:
        offsets = instance_offsets(rng, style, instance_ids)
    image += offsets[instance_ids]

    # Low-frequency texture, different per class.
    # Mostly luminance, with a weak chroma component.
    coarse = rng.standard_normal(size=(8, 16, 3), dtype=np.float32)
    coarse = coarse[..., :1] + 0.25 * coarse
    texture = cv2.resize(coarse, (W, H), interpolation=cv2.INTER_CUBIC)
    image += style.texture * texture * (1 + (label_ids % 3))[..., None] / 2
    if style.windows:
        rows, cols = np.mgrid[0:H, 0:W]
        period = int(rng.integers(6, 11))
        windows = ((rows % period) < period // 2) & ((cols % period) < period // 2)
        image[(label_ids == name2label["building"].id) & windows] *= 0.6
        grain = style.texture * rng.standard_normal(size=(H, W, 1), dtype=np.float32)
        image += np.where((label_ids == name2label["road"].id)[..., None], grain, 0)

    # Lighting: global brightness, vertical gradient, colour cast, vignetting.
    brightness = rng.uniform(0.75, 1.15)
    gradient = np.linspace(1.1, 0.9, H, dtype=np.float32)[:, None, None]
    cast = np.asarray(style.tint, dtype=np.float32) * rng.uniform(*style.colour_cast, size=3).astype(np.float32)
    image = image * brightness * gradient * cast
    if style.vignetting > 0:
        yy, xx = np.mgrid[-1:1:complex(0, H), -1:1:complex(0, W)].astype(np.float32)
        image *= (1 - style.vignetting * (xx**2 + yy**2) / 2)[..., None]
    if style.blur_sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), style.blur_sigma)
    image += style.noise_sigma * rng.standard_normal(size=image.shape, dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


# Version of the scene generator: a folder generated by another version is refused, not mixed.
BENCHMARK_DESIGN = 2

# Benchmark size of ``prepare_synthetic.py`` without options (images are height x width pixels).
DEFAULT_SIZES = {
    "num_source": 400, "num_source_val": 50, "num_target_train": 200, "num_target_val": 50, "height": 128, "width": 256,
}

_LABEL_ID_TO_SYNTHIA = {label_id: synthia_id for synthia_id, label_id in SYNTHIA_TO_LABEL_ID.items()}


def _output_files(domain: str, out_dir: str, split: str, index: int) -> List[str]:
    """Files written for one image: source (RGB, labels), target (image, polygons, labelIds, instanceIds)."""
    if domain == "source":
        name = f"{index:07d}.png"
        return [os.path.join(out_dir, "RGB", name), os.path.join(out_dir, "GT", "LABELS", name)]
    cities = TARGET_TRAIN_CITIES if split == "train" else TARGET_VAL_CITIES
    city = cities[index % len(cities)]
    prefix = f"{city}_{index:06d}_000019"
    gt_prefix = os.path.join(out_dir, "gtFine", split, city, f"{prefix}_gtFine")
    return [
        os.path.join(out_dir, "leftImg8bit", split, city, f"{prefix}_leftImg8bit.png"),
        f"{gt_prefix}_polygons.json",
        f"{gt_prefix}_labelIds.png",
        f"{gt_prefix}_instanceIds.png",
    ]


def _write_source_image(files: List[str], rng: np.random.Generator, height: int, width: int) -> None:
    """SYNTHIA layout: RGB image and 16-bit label PNG with RGB channels (class, instance, 0)."""
    _, label_ids, instance_ids = rasterise(generate_scene(rng, SOURCE_STYLE, height, width), height, width)
    image = render_image(rng, SOURCE_STYLE, label_ids, instance_ids)
    lut = np.zeros(256, dtype=np.uint16)
    for label_id, synthia_id in _LABEL_ID_TO_SYNTHIA.items():
        lut[label_id] = synthia_id
    instance = np.where(instance_ids >= 1000, instance_ids % 1000 + 1, 0).astype(np.uint16)
    # cv2 writes BGR: the RGB channels (class, instance, 0) are stored as (0, instance, class).
    labels_bgr = np.stack([np.zeros_like(instance), instance, lut[label_ids]], axis=-1)
    image_file, label_file = files
    save_png(image_file, image)
    with atomic_path(label_file) as tmp_path:
        if not cv2.imwrite(tmp_path, labels_bgr):
            raise OSError(f"could not write {tmp_path}")


def rare_objects_kept(objects: Sequence[SceneObject], rng: np.random.Generator, fraction: float) -> List[bool]:
    """Which of a scene's ``objects`` to keep when the frequency of :data:`RARE_TARGET_CLASSES` is scaled by
    ``fraction``: an object of those classes is kept when a uniform draw of ``rng`` is below ``fraction``,
    a two-wheeler with its rider (drawn right before it by :func:`generate_scene`), every other object is.
    One draw per rare object or rider whatever ``fraction``, so that the objects kept at a fraction are
    kept at every larger one."""
    kept, rider_kept = [], True
    for label, _ in objects:
        if label in TWO_WHEELERS:
            kept.append(rider_kept)
        elif label in RARE_TARGET_CLASSES:
            kept.append(bool(rng.random() < fraction))
            rider_kept = kept[-1]
        else:
            kept.append(True)
    return kept


def _instance_id_in_scene(objects: Sequence[SceneObject], kept: Sequence[bool]) -> Dict[int, int]:
    """``{instance id in the scene of the kept objects: instance id of the same object in the whole scene}``
    (``createInstanceImage`` numbers the instances of each class in drawing order)."""
    mapping: Dict[int, int] = {}
    in_scene: Counter = Counter()
    in_kept: Counter = Counter()
    for (label, _), keep in zip(objects, kept):
        if not name2label[label].hasInstances:
            continue
        base = name2label[label].id * 1000
        if keep:
            mapping[base + in_kept[label]] = base + in_scene[label]
            in_kept[label] += 1
        in_scene[label] += 1
    return mapping


def _write_target_image(
    files: List[str], rng: np.random.Generator, rare_rng: np.random.Generator, height: int, width: int,
    rare_frequency: float,
) -> None:
    """Cityscapes layout: ``leftImg8bit`` image and ``gtFine`` polygons JSON, labelIds, instanceIds.

    The scene is drawn without the rare objects that :func:`rare_objects_kept` drops at ``rare_frequency``
    (from ``rare_rng``), everything else as in the whole scene: ``rng`` makes the draws of the whole scene
    (its polygons, the colour offsets of its visible instances, then the rendering), every instance keeps
    the colour offset it has in the whole scene, and one that only becomes visible where a rare object is
    removed draws its offset from ``rare_rng``. At ``rare_frequency`` 1 nothing is dropped: the image of the
    whole scene.
    """
    scene = generate_scene(rng, TARGET_STYLE, height, width)
    kept = rare_objects_kept(scene, rare_rng, rare_frequency)
    polygons_json, label_ids, instance_ids = rasterise([obj for obj, keep in zip(scene, kept) if keep], height, width)
    scene_instance_ids = rasterise(scene, height, width)[2]
    scene_offsets = instance_offsets(rng, TARGET_STYLE, scene_instance_ids)
    visible_in_scene = set(_visible_instances(scene_instance_ids).tolist())
    in_scene = _instance_id_in_scene(scene, kept)
    offsets = np.zeros((instance_ids.max() + 1, 3), dtype=np.float32)
    for instance in _visible_instances(instance_ids):
        if in_scene[instance] in visible_in_scene:
            offsets[instance] = scene_offsets[in_scene[instance]]
        else:
            variation = TARGET_STYLE.instance_variation
            offsets[instance] = rare_rng.uniform(-variation, variation, size=3)
    image = render_image(rng, TARGET_STYLE, label_ids, instance_ids, offsets)
    image_file, polygons_file, label_file, instance_file = files
    save_png(image_file, image)
    write_json(polygons_file, polygons_json, indent=None)
    save_png(label_file, label_ids)
    save_png(instance_file, instance_ids.astype(np.uint16))


_DOMAIN_CODES = {
    ("source", "train"): (0, 0), ("target", "train"): (1, 1), ("target", "val"): (1, 2), ("source", "val"): (0, 3)
}


def _write_image(task: Tuple[str, str, str, int, int, int, int, float]) -> None:
    domain, out_dir, split, index, seed, height, width, rare_frequency = task
    seed_sequence = np.random.SeedSequence([seed, *_DOMAIN_CODES[domain, split], index])
    rng = np.random.default_rng(seed_sequence)
    files = _output_files(domain, out_dir, split, index)
    if domain == "source":
        _write_source_image(files, rng, height, width)
    else:
        # Which rare objects are kept: a stream of its own, so that the rest of the scene does not depend on it.
        rare_rng = np.random.default_rng(seed_sequence.spawn(1)[0])
        _write_target_image(files, rng, rare_rng, height, width, rare_frequency)


def generate_synthetic(
    out_dir: str,
    seed: int = 0,
    num_source: int = DEFAULT_SIZES["num_source"],
    num_target_train: int = DEFAULT_SIZES["num_target_train"],
    num_target_val: int = DEFAULT_SIZES["num_target_val"],
    height: int = DEFAULT_SIZES["height"],
    width: int = DEFAULT_SIZES["width"],
    workers: int = 1,
    num_source_val: int = DEFAULT_SIZES["num_source_val"],
    rare_frequency: float = 1.0,
) -> Dict[str, str]:
    """Generate the raw benchmark under ``out_dir``.

    Writes ``out_dir/source`` (SYNTHIA-RAND-CITYSCAPES layout), ``out_dir/source_val`` (held-out
    source images, same layout), ``out_dir/target`` (Cityscapes layout, train and val), and the settings
    in ``out_dir/generation.json``. Deterministic in ``seed`` whatever ``workers``. ``rare_frequency``
    (0 < f <= 1) scales the frequency of :data:`RARE_TARGET_CLASSES` in the target train split: each of
    their objects is kept with that probability, drawn from a random stream of its own, the rest of every
    image as at 1 (:func:`_write_target_image`); the source splits and target val do not change. Recorded
    in ``generation.json`` when it is not 1, so that the benchmarks of 1 are those generated before it
    existed. Re-running with the
    same settings only writes the images with a missing, truncated or corrupt file
    (:func:`~.conversion.data_file_error`); a folder
    generated with other settings is refused (the converters would mix both).

    Returns:
        ``{"source": path, "source_val": path, "target": path}``.
    """
    if not 0 < rare_frequency <= 1:
        raise ValueError(f"rare_frequency={rare_frequency} must lie in (0, 1]: the fraction of the rare objects kept")
    settings = {
        "design": BENCHMARK_DESIGN,
        "seed": seed,
        "num_source": num_source,
        "num_source_val": num_source_val,
        "num_target_train": num_target_train,
        "num_target_val": num_target_val,
        "height": height,
        "width": width,
    }
    if rare_frequency != 1.0:
        settings["rare_frequency"] = rare_frequency
    settings_file = os.path.join(out_dir, "generation.json")
    if os.path.exists(settings_file):
        with open(settings_file) as f:
            previous = json.load(f)
        if previous != settings:
            raise ValueError(
                f"{out_dir} holds a benchmark generated with {previous}, not {settings}; "
                "delete it or choose another folder"
            )
    write_json(settings_file, settings, indent=None)

    source_dir, target_dir = os.path.join(out_dir, "source"), os.path.join(out_dir, "target")
    source_val_dir = os.path.join(out_dir, "source_val")
    tasks = [("source", source_dir, "train", i, seed, height, width, 1.0) for i in range(num_source)]
    tasks += [("source", source_val_dir, "val", i, seed, height, width, 1.0) for i in range(num_source_val)]
    tasks += [("target", target_dir, "train", i, seed, height, width, rare_frequency) for i in range(num_target_train)]
    tasks += [("target", target_dir, "val", i, seed, height, width, 1.0) for i in range(num_target_val)]
    # Images with a missing, truncated or corrupt file are written again.
    tasks = [task for task in tasks if any(map(data_file_error, _output_files(*task[:4])))]
    progress = dict(total=len(tasks), desc="generating synthetic scenes", disable=not tasks)
    if workers <= 1:
        for task in tqdm(tasks, **progress):
            _write_image(task)
    else:
        for _ in tqdm(parallel_map(_write_image, tasks, workers, ordered=False, chunksize=8, preload=[__name__]), **progress):
            pass
    return {"source": source_dir, "source_val": source_val_dir, "target": target_dir}


def prepare_synthetic(
    out_dir: str,
    seed: int = 0,
    num_source: int = DEFAULT_SIZES["num_source"],
    num_target_train: int = DEFAULT_SIZES["num_target_train"],
    num_target_val: int = DEFAULT_SIZES["num_target_val"],
    height: int = DEFAULT_SIZES["height"],
    width: int = DEFAULT_SIZES["width"],
    workers: int = 1,
    num_source_val: int = DEFAULT_SIZES["num_source_val"],
    rare_frequency: float = 1.0,
) -> List[Tuple[str, ConversionReport]]:
    """Generate the benchmark (:func:`generate_synthetic`) and prepare it with the real converters:
    ``prepare_synthia`` on ``out_dir/source`` and ``out_dir/source_val``, ``prepare_cityscapes`` on
    ``out_dir/target``.

    Returns:
        ``[(name, report)]`` of the four conversions (source, source val, target train, target val).
    """
    folders = generate_synthetic(
        out_dir, seed, num_source, num_target_train, num_target_val, height, width, workers, num_source_val,
        rare_frequency,
    )
    reports = [("synthetic source", prepare_synthia(folders["source"], workers))]
    reports.append(("synthetic source val", prepare_synthia(folders["source_val"], workers)))
    for split in ("train", "val"):
        reports.append((f"synthetic target {split}", prepare_cityscapes(folders["target"], split, workers)))
    return reports


DESCRIPTION = """\
Generate the synthetic two-domain street-scene benchmark and prepare it with the same converters as
the real datasets.

Writes (OUT = e.g. datasets/synthetic):
  OUT/source/   SYNTHIA-RAND-CITYSCAPES layout (RGB/, GT/LABELS/), converted by prepare_synthia
  OUT/source_val/  held-out source images, same layout
  OUT/target/   Cityscapes layout (leftImg8bit/, gtFine/ with *_polygons.json, *_labelIds.png,
                *_instanceIds.png; splits train and val), converted by prepare_cityscapes

Registered as synthetic_source_panoptic_{train,val}, synthetic_target_panoptic_train and
synthetic_target_panoptic_val when OUT is <datasets root>/synthetic. Both domains share one class
palette; the source is saturated, sharp and person-heavy with a random camera pitch; the target is
desaturated and tinted, with textures, colour cast, vignetting, blur and noise, a fixed camera, more
cars and terrain. Deterministic in --seed.
"""


@exit_code_on_missing_input
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = conversion_parser(DESCRIPTION, "synthetic")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    for option, help_text in (
        ("num_source", "source images"),
        ("num_source_val", "held-out source images"),
        ("num_target_train", "target train images"),
        ("num_target_val", "target val images"),
        ("height", "image height in pixels"),
        ("width", "image width in pixels"),
    ):
        parser.add_argument(
            "--" + option.replace("_", "-"), type=int, default=DEFAULT_SIZES[option],
            help=f"{help_text} (default: %(default)s)",
        )
    parser.add_argument(
        "--rare-frequency", type=float, default=1.0,
        help="factor in (0, 1] on the frequency of the rare classes (" + ", ".join(RARE_TARGET_CLASSES) + ") in the "
        "target train split: each of their objects is kept with this probability, the rest of the images as at 1 "
        "(default: %(default)s, the standard benchmark)",
    )
    args = parser.parse_args(argv)
    reports = prepare_synthetic(
        args.root,
        args.seed,
        args.num_source,
        args.num_target_train,
        args.num_target_val,
        args.height,
        args.width,
        args.workers,
        args.num_source_val,
        args.rare_frequency,
    )
    return max(print_report(report, name) for name, report in reports)
