"""Image augmentation on device, inside the jitted step, from the uint8 batch the host ships.

Every random choice for an example is drawn from `fold_in(key, example_id)`, where the id is
the example's row in the global batch: the same key gives the same augmented images however
the batch is split over devices (jit over a mesh or pmap) or microbatches.

- random resized crop (Inception-style: area and aspect ranges), resized back bilinearly with
  `jax.image.scale_and_translate`, one image at a time under `vmap`;
- horizontal flip (dm-pix);
- mixup and cutmix with a partner: each example mixes with the other row of its pair (rows
  2i and 2i + 1; the loader's shuffle makes partners random), so no data crosses the pair,
  and with its own Beta(alpha, alpha) draw. Targets mix by the same share (cutmix: the share
  of pixels actually pasted);
- normalisation: pixels / 255, then (x - mean) / std per channel.

dm-pix has the flips and crops of fixed size; the resized crop and the mixing are written here
because it has neither.
"""
from __future__ import annotations

import dm_pix as pix
import jax
import jax.numpy as jnp

from ptft_jax.config.schema import AugmentConfig


def normalize(images, aug: AugmentConfig):
    """uint8 [batch, h, w, c] -> float32, scaled to [0, 1] and normalised per channel."""
    x = images.astype(jnp.float32) / 255.0
    mean = jnp.asarray(aug.mean, jnp.float32)
    std = jnp.asarray(aug.std, jnp.float32)
    return (x - mean) / std


def _resized_crop(key, image, scale, ratio):
    """One Inception-style crop of `image` [h, w, c], resized back to [h, w]. Area and aspect
    are drawn once (not rejection-sampled, as torchvision does): the crop is clipped to the
    image, which keeps the draw a fixed-shape computation."""
    h, w = image.shape[0], image.shape[1]
    k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1]) * h * w
    log_ratio = jax.random.uniform(k_ratio, (), minval=jnp.log(ratio[0]),
                                   maxval=jnp.log(ratio[1]))
    aspect = jnp.exp(log_ratio)
    crop_w = jnp.clip(jnp.sqrt(area * aspect), 1.0, w)
    crop_h = jnp.clip(jnp.sqrt(area / aspect), 1.0, h)
    y0 = jax.random.uniform(k_y, ()) * (h - crop_h)
    x0 = jax.random.uniform(k_x, ()) * (w - crop_w)
    scale_yx = jnp.stack([h / crop_h, w / crop_w])
    translate = -jnp.stack([y0, x0]) * scale_yx
    return jax.image.scale_and_translate(image, image.shape, (0, 1), scale_yx, translate,
                                         method="linear", antialias=True)


def _partner(x):
    """Each row's pair partner: rows 2i and 2i + 1 swap."""
    pairs = x.reshape(x.shape[0] // 2, 2, *x.shape[1:])
    return pairs[:, ::-1].reshape(x.shape)


def _cutmix_mask(key, h: int, w: int, lam):
    """A box of about (1 - lam) of the image, centred uniformly and clipped; [h, w] bool."""
    k_y, k_x = jax.random.split(key)
    cut = jnp.sqrt(1.0 - lam)
    ch, cw = cut * h, cut * w
    cy = jax.random.uniform(k_y, ()) * h
    cx = jax.random.uniform(k_x, ()) * w
    ys, xs = jnp.arange(h)[:, None] + 0.5, jnp.arange(w)[None, :] + 0.5
    return (jnp.abs(ys - cy) <= ch / 2) & (jnp.abs(xs - cx) <= cw / 2)


def augment(images, targets, key, example_ids, aug: AugmentConfig):
    """(augmented float images, mixed targets) for a training batch. `images` are uint8
    [batch, h, w, c], `targets` float [batch, classes] (one-hot, maybe smoothed)."""
    x = normalize(images, aug)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids)
    k_crop, k_flip, k_mix = (jax.vmap(lambda k, n=n: jax.random.fold_in(k, n))(keys)
                             for n in range(3))
    if aug.random_resized_crop:
        x = jax.vmap(lambda k, im: _resized_crop(k, im, aug.crop_scale, aug.crop_ratio))(
            k_crop, x)
    if aug.flip:
        x = jax.vmap(pix.random_flip_left_right)(k_flip, x)
    if aug.mixup > 0 or aug.cutmix > 0:
        x, targets = _mix(x, targets, k_mix, aug)
    return x, targets


def _mix(x, targets, keys, aug: AugmentConfig):
    h, w = x.shape[1], x.shape[2]

    def draw(key):
        k_on, k_kind, k_lam, k_box = jax.random.split(key, 4)
        use_cutmix = (aug.cutmix > 0) & ((aug.mixup == 0) |
                                         jax.random.bernoulli(k_kind, 0.5))
        alpha = jnp.where(use_cutmix, max(aug.cutmix, 1e-6), max(aug.mixup, 1e-6))
        lam = jax.random.beta(k_lam, alpha, alpha)
        box = _cutmix_mask(k_box, h, w, lam)
        on = jax.random.bernoulli(k_on, aug.mix_prob)
        # Cutmix: the share of own pixels is what the box left, not the drawn lam.
        keep = jnp.where(use_cutmix, ~box, jnp.ones((h, w), bool))
        share = jnp.where(use_cutmix, jnp.mean(keep.astype(jnp.float32)), lam)
        return on, use_cutmix, keep, jnp.where(on, share, 1.0)

    on, use_cutmix, keep, share = jax.vmap(draw)(keys)
    other, other_targets = _partner(x), _partner(targets)
    blend = share[:, None, None, None] * x + (1 - share[:, None, None, None]) * other
    pasted = jnp.where(keep[..., None], x, other)
    mixed = jnp.where((on & use_cutmix)[:, None, None, None], pasted,
                      jnp.where(on[:, None, None, None], blend, x))
    return mixed, share[:, None] * targets + (1 - share[:, None]) * other_targets
