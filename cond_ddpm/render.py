"""A small numpy ray tracer for synthetic i-CLEVR scenes.

Each scene holds three objects on a grey ground plane, seen by a perspective camera, lit by a key light that casts
shadows, a fill light and ambient light. Objects come in three shapes (cube, sphere, cylinder), eight CLEVR colours,
two materials (matte rubber, shiny metal) and two sizes. `render_scene` returns the three images of a scene at
once — first object alone, first two, all three — the way i-CLEVR's `CLEVR_train_XXXXXX_{0,1,2}.png` files add
one object each. The primary and shadow rays are traced once per scene and shared by the three images.
"""

from dataclasses import dataclass
from functools import cached_property

import numpy as np

RENDERER_VERSION = 2  # bump when a change alters the images: cached synthetic sets are keyed by it
WIDTH, HEIGHT = 320, 240
SHAPES = ("cube", "sphere", "cylinder")
# CLEVR's own palette (properties.json of the CLEVR generator), in sRGB 0-255.
COLORS = {
    "gray": (87, 87, 87),
    "red": (173, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 105, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
SIZES = {"large": 0.95, "small": 0.65}
MATERIALS = ("rubber", "metal")
GROUND_ALBEDO = 0.3
PLACEMENT_RANGE = 2.4  # objects stand in [-2.4, 2.4]^2, which this camera sees whole
MIN_VISIBLE_FRACTION = 0.5  # CLEVR also rejects scenes where an object is mostly hidden
_EPS = 1e-4


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    material: str
    radius: float
    x: float
    y: float
    angle: float  # rotation about the vertical axis, radians

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def half_height(self) -> float:
        # Cylinders are as tall as they are wide and slimmer than cubes, as in CLEVR: at 32x32 pixels their
        # silhouettes must still differ from a cube's.
        return {"sphere": 1.0, "cube": 0.8, "cylinder": 0.85}[self.shape] * self.radius

    @property
    def footprint_radius(self) -> float:
        return {"sphere": 1.0, "cube": 0.8, "cylinder": 0.7}[self.shape] * self.radius

    @property
    def center(self) -> np.ndarray:
        return np.array([self.x, self.y, self.half_height])


@dataclass(frozen=True)
class Camera:
    position: np.ndarray
    target: np.ndarray
    fov_degrees: float = 42.0

    @cached_property
    def basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """The camera's forward, right and up unit vectors, and its focal length in pixels."""
        forward = self.target - self.position
        forward /= np.linalg.norm(forward)
        right = np.cross(forward, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        return forward, right, np.cross(right, forward), (WIDTH / 2) / np.tan(np.radians(self.fov_degrees) / 2)

    @cached_property
    def rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Origin (3,) and unit directions (H*W, 3) of the primary rays, row-major from the top-left pixel."""
        forward, right, up, focal = self.basis
        uu, vv = np.meshgrid(np.arange(WIDTH) + 0.5 - WIDTH / 2, np.arange(HEIGHT) + 0.5 - HEIGHT / 2)
        directions = forward + (uu[..., None] * right - vv[..., None] * up) / focal
        directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
        return self.position, directions.reshape(-1, 3)

    def in_frame(self, obj: "SceneObject", margin: int = 4) -> bool:
        """Whether all of the object (its bounding sphere) projects at least `margin` pixels inside the image."""
        forward, right, up, focal = self.basis
        offset = obj.center - self.position
        depth = offset @ forward
        u = WIDTH / 2 + focal * (offset @ right) / depth
        v = HEIGHT / 2 - focal * (offset @ up) / depth
        extent = margin + focal * np.hypot(obj.footprint_radius * np.sqrt(2), obj.half_height) / depth
        return extent <= u <= WIDTH - extent and extent <= v <= HEIGHT - extent


def _rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _bounding_sphere_candidates(obj: SceneObject, origins: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Indices of the rays that pass the object's bounding sphere: the exact tests only run on those."""
    bound = np.hypot(obj.footprint_radius * np.sqrt(2), obj.half_height) + 1e-3
    offset = origins - obj.center
    b = np.einsum("ij,ij->i", offset, directions) if offset.ndim == 2 else directions @ offset
    c = np.einsum("ij,ij->i", offset, offset) if offset.ndim == 2 else offset @ offset
    return np.nonzero((b * b - c + bound * bound > 0) & (b < bound))[0]


def intersect(obj: SceneObject, origins: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance along each ray to the object's surface (inf on a miss) and the world-space normal there.

    `origins` is one point (3,) shared by all rays or one per ray (N, 3); `directions` are unit vectors (N, 3).
    """
    n = len(directions)
    distance = np.full(n, np.inf)
    normal = np.zeros((n, 3))
    idx = _bounding_sphere_candidates(obj, origins, directions)
    if idx.size == 0:
        return distance, normal
    rotation = _rotation_z(obj.angle)
    base = np.array([obj.x, obj.y, 0.0])
    o = (origins[idx] if origins.ndim == 2 else origins[None]) - base
    d = directions[idx] @ rotation  # into the object's frame (row vectors: x R == R^T x)
    o = np.broadcast_to(o @ rotation, d.shape)
    h = obj.half_height
    if obj.shape == "sphere":
        t, local_normal = _hit_sphere(o - [0.0, 0.0, h], d, obj.radius)
    elif obj.shape == "cube":
        t, local_normal = _hit_box(o - [0.0, 0.0, h], d, h)
    else:
        t, local_normal = _hit_cylinder(o, d, obj.footprint_radius, 2 * h)
    distance[idx] = t
    normal[idx] = local_normal @ rotation.T
    return distance, normal


def _hit_sphere(o, d, radius):
    b = np.einsum("ij,ij->i", o, d)
    c = np.einsum("ij,ij->i", o, o) - radius * radius
    disc = b * b - c
    t = -b - np.sqrt(np.maximum(disc, 0.0))
    t = np.where((disc > 0) & (t > _EPS), t, np.inf)
    normal = (o + np.where(np.isfinite(t), t, 0.0)[:, None] * d) / radius
    return t, normal


def _hit_box(o, d, half):
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        t1, t2 = (-half - o) * inv, (half - o) * inv
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near, t_far = near.max(axis=1), far.min(axis=1)
    t = np.where((t_far >= t_near) & (t_near > _EPS), t_near, np.inf)
    axis = near.argmax(axis=1)
    normal = np.zeros_like(o)
    normal[np.arange(len(o)), axis] = -np.sign(d[np.arange(len(o)), axis])
    return t, normal


def _hit_cylinder(o, d, radius, height):
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1]
    c = o[:, 0] ** 2 + o[:, 1] ** 2 - radius * radius
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        z_side = o[:, 2] + t_side * d[:, 2]
        side_ok = (disc > 0) & (t_side > _EPS) & (z_side >= 0) & (z_side <= height)
        t_cap = (height - o[:, 2]) / d[:, 2]
    cap_xy = o[:, :2] + t_cap[:, None] * d[:, :2]
    cap_ok = (t_cap > _EPS) & (np.einsum("ij,ij->i", cap_xy, cap_xy) <= radius * radius)
    t_side = np.where(side_ok, t_side, np.inf)
    t_cap = np.where(cap_ok, t_cap, np.inf)
    t = np.minimum(t_side, t_cap)
    hit = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
    side_normal = np.stack([hit[:, 0], hit[:, 1], np.zeros(len(o))], axis=1) / radius
    cap_normal = np.broadcast_to([0.0, 0.0, 1.0], o.shape)
    normal = np.where((t_cap < t_side)[:, None], cap_normal, side_normal)
    return t, normal


@dataclass(frozen=True)
class Lighting:
    key_direction: np.ndarray  # unit vector towards the key light
    key_strength: float = 0.85
    fill_direction: tuple = (-0.6, -0.2, 0.77)
    fill_strength: float = 0.2
    ambient: float = 0.3


def _shade(albedo, normal, view, metal, light: Lighting) -> tuple[np.ndarray, np.ndarray]:
    """sRGB colours (N, 3) of object surface points, in shadow and lit by the key light.

    Both are computed once per surface and shared by the three images of a scene, which differ only in which
    points are hidden or shadowed.
    """
    key = np.clip(normal @ light.key_direction, 0.0, None)
    fill = np.clip(normal @ np.asarray(light.fill_direction), 0.0, None)
    diffuse = albedo * (0.55 if metal else 1.0)
    halfway = light.key_direction - view
    halfway /= np.linalg.norm(halfway, axis=1, keepdims=True)
    n_dot_h = np.clip(np.einsum("ij,ij->i", normal, halfway), 0.0, None)
    specular = 0.9 * n_dot_h**60 if metal else 0.08 * n_dot_h**6
    dark = diffuse * (light.ambient + light.fill_strength * fill)[:, None]
    if metal:  # metal also mirrors a dim grey environment that brightens towards the sky
        reflected_z = view[:, 2] - 2 * np.einsum("ij,ij->i", view, normal) * normal[:, 2]
        dark += 0.45 * (0.25 + 0.35 * np.clip(reflected_z, 0.0, 1.0))[:, None] * (0.35 + albedo)
    lit = dark + diffuse * light.key_strength * key[:, None] + specular[:, None]
    return _linear_to_srgb(dark), _linear_to_srgb(lit)


def render_scene(objects: list[SceneObject], camera: Camera, light: Lighting) -> list[np.ndarray]:
    """Render the scene's images with the first 1, 2, ..., len(objects) objects: uint8 RGBA arrays (H, W, 4)."""
    origin, directions = camera.rays
    # The matte ground faces up, so its shading is one number per pixel (the studio falloff) times a constant.
    with np.errstate(divide="ignore"):
        t_ground = np.where(directions[:, 2] < 0, -origin[2] / directions[:, 2], np.inf)
    ground_points = origin + t_ground[:, None] * directions
    ground_albedo = GROUND_ALBEDO * _ground_falloff(ground_points)
    ground_dark = ground_albedo * (light.ambient + light.fill_strength * light.fill_direction[2])
    ground_lit = ground_dark + ground_albedo * light.key_strength * light.key_direction[2]
    ground_dark, ground_lit = _linear_to_srgb(ground_dark), _linear_to_srgb(ground_lit)
    ground_points[:, 2] = 1e-3
    # Row k: shadowed by any of the first k + 1 objects.
    ground_shadow = np.logical_or.accumulate(_shadowed_by(objects, ground_points, light, skip=None), axis=0)

    # Primary hits do not depend on the other objects, so each object is traced and shaded once for all images.
    surfaces = []
    for k, obj in enumerate(objects):
        t, normal = intersect(obj, origin, directions)
        idx = np.nonzero(np.isfinite(t))[0]
        points = origin + t[idx, None] * directions[idx] + 1e-3 * normal[idx]
        albedo = np.broadcast_to(_srgb_to_linear(COLORS[obj.color]), (len(idx), 3))
        dark, lit = _shade(albedo, normal[idx], directions[idx], obj.material == "metal", light)
        shadow = np.logical_or.accumulate(_shadowed_by(objects, points, light, skip=k), axis=0)
        surfaces.append((t[idx], idx, dark, lit, shadow))

    images = []
    depth, owner = t_ground.copy(), np.full(len(directions), -1)
    for count, (t, idx, *_) in enumerate(surfaces, start=1):
        closer = t < depth[idx]
        depth[idx[closer]], owner[idx[closer]] = t[closer], count - 1
        rgba = np.full((len(directions), 4), 255, dtype=np.uint8)
        rgba[:, :3] = np.where(ground_shadow[count - 1, :, None], ground_dark, ground_lit)
        for k, (_, obj_idx, dark, lit, shadow) in enumerate(surfaces[:count]):
            shown = owner[obj_idx] == k
            rgba[obj_idx[shown], :3] = np.where(shadow[count - 1, shown, None], dark[shown], lit[shown])
        images.append(rgba.reshape(HEIGHT, WIDTH, 4))
    return images


def _shadowed_by(objects, points, light, skip):
    """(len(objects), len(points)) booleans: does object k block the key light at each point?"""
    blockers = np.zeros((len(objects), len(points)), dtype=bool)
    towards_light = np.broadcast_to(light.key_direction, points.shape)
    for k, obj in enumerate(objects):
        if k != skip:  # a convex shape never shadows its own lit side
            blockers[k] = np.isfinite(intersect(obj, points, towards_light)[0])
    return blockers


def visible_fractions(objects: list[SceneObject], camera: Camera) -> np.ndarray:
    """For the full scene: the fraction of each object's own silhouette that no nearer object hides."""
    _, directions = camera.rays
    directions = directions[::3]  # a coarse sampling of the frame is enough to judge occlusion
    distances = np.stack([intersect(obj, camera.position, directions)[0] for obj in objects])
    nearest = distances.argmin(axis=0)
    alone = np.isfinite(distances).sum(axis=1)
    shown = np.array([(np.isfinite(distances[k]) & (nearest == k)).sum() for k in range(len(objects))])
    return shown / np.maximum(alone, 1)


def _ground_falloff(points):
    # CLEVR's studio lights leave the far and outer ground a little darker.
    return (1.0 - 0.04 * np.hypot(points[:, 0], points[:, 1])).clip(0.6, 1.0)[:, None]


def _srgb_to_linear(rgb):
    c = np.asarray(rgb, dtype=float) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _srgb_table(levels: int = 4096) -> np.ndarray:
    c = np.linspace(0.0, 1.0, levels)
    return np.round(255 * np.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1 / 2.4) - 0.055)).astype(np.uint8)


_SRGB_TABLE = _srgb_table()


def _linear_to_srgb(c):
    # A lookup table: the exact power law over every pixel costs more than the rest of the shading.
    return _SRGB_TABLE[np.round(np.clip(c, 0.0, 1.0) * (len(_SRGB_TABLE) - 1)).astype(np.intp)]


def random_scene(
    rng: np.random.Generator, class_names: list[str], num_objects: int = 3, names: list[str] | None = None
):
    """Draw a scene the way CLEVR does: distinct objects, no overlaps, none mostly hidden, slight camera and light
    jitter.

    The objects are `num_objects` distinct ones of `class_names`, or exactly `names` (a label set) when given.
    """
    if names is not None and (not names or len(set(names)) != len(names) or not set(names) <= set(class_names)):
        raise ValueError(f"names must be a non-empty list of distinct objects of class_names, got {names!r}")
    camera = Camera(
        position=np.array([0.0, -7.2, 5.4]) + rng.normal(0.0, 0.15, 3),
        target=np.array([0.0, 0.2, 0.0]),
    )
    azimuth, elevation = np.radians(rng.uniform(-60, -20)), np.radians(rng.uniform(45, 60))
    light = Lighting(
        key_direction=np.array(
            [np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)]
        )
    )
    while True:
        objects = []
        for name in rng.choice(class_names, size=num_objects, replace=False) if names is None else names:
            color, shape = name.split(" ")
            radius = SIZES[rng.choice(list(SIZES))]
            x, y = rng.uniform(-PLACEMENT_RANGE, PLACEMENT_RANGE, 2)
            if any(np.hypot(x - o.x, y - o.y) < 1.3 * (radius + o.radius) + 0.1 for o in objects):
                break
            objects.append(
                SceneObject(shape, color, str(rng.choice(MATERIALS)), radius, x, y, rng.uniform(0, np.pi / 2))
            )
        else:
            in_frame = all(camera.in_frame(obj) for obj in objects)
            if in_frame and visible_fractions(objects, camera).min() >= MIN_VISIBLE_FRACTION:
                return objects, camera, light
