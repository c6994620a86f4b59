"""Colour matching: a model that regenerates a region may shift its colours a little, which shows
as a box; `match_colours` adds inside the region the smooth offset that takes the generated border to
the input's. Which windows of the image the model sees, and how its outputs go back, is
`hmar.edit_window`.
"""
from __future__ import annotations

import numpy as np  # cv2 is imported in the functions that use it: the CLI imports this module to start

# Colour matching (`match_colours`): the generated region's colours are compared with the input's
# along a ring of this many pixels inside the region's edge (at the model's resolution; scaled to the
# output), low-passed over about as many pixels, and Jacobi sweeps per pyramid level fill the offset in.
MATCH_RING = 3.0
MATCH_SWEEPS = 40
MATCH_OUTLIER = 12.0  # levels of 255 (RGB distance) from the ring's fitted cast: content, not a cast


def match_colours(generated: np.ndarray, original: np.ndarray, region: np.ndarray, known: np.ndarray,
                  ring: float = MATCH_RING) -> np.ndarray:
    """`generated` (H, W, 3) float32 with its `region` shifted by a smooth colour offset so that it
    meets the `known` pixels of `original` at the region's edge, as Poisson image editing would if the
    region's own gradients guided it: along a ring `ring` pixels wide inside the edge, the offset is
    the input's local colour (from masked blurs of the known pixels nearby) minus the generated one
    (the same over the region), and inside the ring it is the membrane (harmonic) interpolation of
    that, with reflecting edges where the region meets the image border. Ring pixels whose offset is
    far from a robust smooth fit of the ring's offsets (content cut by the edge) set none. Detail is
    the generated image's own; only a slowly varying colour shift is removed. (H, W) bool masks.
    A ring wider than `MATCH_RING` (an output larger than the model's view) is worked out at the
    scale where it is `MATCH_RING` pixels, and the offset resized back."""
    import cv2
    if not region.any() or not known.any():
        return generated
    margin = int(np.ceil(4 * ring)) + 1
    ys, xs = np.nonzero(region)
    height, width = region.shape
    y0, y1 = max(0, ys.min() - margin), min(height, ys.max() + 1 + margin)
    x0, x1 = max(0, xs.min() - margin), min(width, xs.max() + 1 + margin)
    inside, beside = region[y0:y1, x0:x1], known[y0:y1, x0:x1]
    crops = generated[y0:y1, x0:x1], original[y0:y1, x0:x1]
    shrink = ring / MATCH_RING
    if shrink > 1.5:
        size = (max(1, round((x1 - x0) / shrink)), max(1, round((y1 - y0) / shrink)))
        small = [cv2.resize(np.ascontiguousarray(a), size, interpolation=cv2.INTER_AREA) for a in (*crops, inside.astype(np.float32), beside.astype(np.float32))]
        fill = _colour_offset(small[0], small[1], small[2] > 0.5, small[3] > 0.999, MATCH_RING)
        fill = None if fill is None else cv2.resize(fill, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    else:
        fill = _colour_offset(*crops, inside, beside, ring)
    if fill is None:
        return generated
    result = generated.copy()
    window = result[y0:y1, x0:x1]
    window[inside] += fill[inside]
    return result


def _colour_offset(generated: np.ndarray, original: np.ndarray, inside: np.ndarray, beside: np.ndarray,
                   ring: float) -> np.ndarray | None:
    """`match_colours`' offset field over a crop, or None where nothing sets it."""
    import cv2
    if not inside.any() or not beside.any():
        return None
    # the ring: region pixels within `ring` of a known one
    distance = cv2.distanceTransform((~beside).astype(np.uint8), cv2.DIST_L2, 5)
    on_ring = inside & (distance <= ring)
    if not on_ring.any():
        return None
    offset = (_edge_colour(original, beside, ring) - _edge_colour(generated, inside, ring)).astype(np.float32)
    # A colour cast shifts the ring alike (or drifting slowly) wherever one surface (a background)
    # meets itself across the edge; where content crosses the edge (an object cut by the region,
    # drawn differently inside) the offsets scatter. So the cast is a robust smooth fit to the ring's
    # offsets, and only pixels near it set the offset: the membrane carries theirs across the others.
    ring_y, ring_x = np.nonzero(on_ring)
    cast = _smooth_cast(offset[on_ring], np.stack([ring_y, ring_x], axis=-1).astype(np.float32), MATCH_OUTLIER)
    anchors = np.zeros_like(on_ring)
    anchors[ring_y, ring_x] = np.linalg.norm(offset[on_ring] - cast, axis=-1) <= MATCH_OUTLIER
    if not anchors.any():
        return None
    return _membrane(np.where(anchors[..., None], offset, 0.0).astype(np.float32), anchors)


def _smooth_cast(offsets: np.ndarray, positions: np.ndarray, width: float, rounds: int = 6) -> np.ndarray:
    """The cast at each of N ring pixels: a robust fit of a plane in position to the (N, 3)
    offsets. It starts from the offsets near the densest cell of a `width` grid (the mode: robust
    where most of the ring is content, not cast), then reweights (Huber, scale `width`), so that a
    cast that drifts along the ring is followed and offsets far from the plane barely count."""
    cells, counts = np.unique(np.round(offsets / width).astype(np.int64), axis=0, return_counts=True)
    weight = (np.linalg.norm(offsets - cells[counts.argmax()] * width, axis=-1) <= width).astype(np.float64)
    centred = (positions - positions.mean(axis=0)) / max(float(positions.std()), 1.0)
    design = np.concatenate([np.ones((len(offsets), 1)), centred], axis=1)
    for _ in range(rounds):
        root = np.sqrt(weight)[:, None]
        coefficients = np.linalg.lstsq(design * root, offsets * root, rcond=None)[0]
        distance = np.linalg.norm(offsets - design @ coefficients, axis=-1)
        weight = np.minimum(1.0, width / np.maximum(distance, 1e-6))
    return (design @ coefficients).astype(np.float32)


def _edge_colour(values: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """The local colour of the `mask` side of an edge, extrapolated to each pixel: a masked blur's
    centroid lies inside the mask, about in proportion to the blur's width, so twice the blur at
    `sigma` minus the blur at 2·sigma cancels the bias a colour gradient would give."""
    return 2.0 * _masked_blur(values, mask, sigma) - _masked_blur(values, mask, 2.0 * sigma)


def _masked_blur(values: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of `values` over the `mask` pixels only (normalised convolution)."""
    import cv2
    weight = mask.astype(np.float32)
    blurred = cv2.GaussianBlur(values * weight[..., None], (0, 0), sigma)
    norm = cv2.GaussianBlur(weight, (0, 0), sigma)[..., None]
    return (blurred / np.maximum(norm, 1e-6)).astype(np.float32)


def _shrink_known(values: np.ndarray, known: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """`values` and `known` at `size` (W, H): each coarse pixel the mean of the known values it covers,
    known where it covers any."""
    import cv2
    share = cv2.resize(known.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    coarse = cv2.resize(values * known[..., None], size, interpolation=cv2.INTER_AREA) / np.maximum(share, 1e-6)[..., None]
    return coarse.astype(np.float32), share > 0


def _membrane(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """`values` kept where `known`, harmonic elsewhere (each pixel the mean of its 4 neighbours; edges
    reflect): Jacobi sweeps, started from the solution at half the resolution."""
    import cv2
    height, width = known.shape
    if known.all():
        return values
    if min(height, width) > 8:
        fill = cv2.resize(_membrane(*_shrink_known(values, known, ((width + 1) // 2, (height + 1) // 2))), (width, height),
                          interpolation=cv2.INTER_LINEAR)
    else:
        fill = np.broadcast_to(values[known].mean(axis=0), values.shape).astype(np.float32)
    fill = np.where(known[..., None], values, fill)
    for _ in range(MATCH_SWEEPS):
        edged = np.pad(fill, ((1, 1), (1, 1), (0, 0)), mode="edge")
        mean = (edged[:-2, 1:-1] + edged[2:, 1:-1] + edged[1:-1, :-2] + edged[1:-1, 2:]) * 0.25
        fill = np.where(known[..., None], values, mean)
    return fill
