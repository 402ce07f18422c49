"""A small Vision Transformer (Dosovitskiy et al., 2021) built only from dense layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from archs.layers import linear


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """[b, h, w, c] -> [b, (h / p) * (w / p), p * p * c], patches in row-major order."""
    b, h, w, c = x.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"Image size {h}x{w} is not divisible by patch size {patch_size}.")
    gh, gw = h // patch_size, w // patch_size
    x = x.reshape(b, gh, patch_size, gw, patch_size, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, patch_size * patch_size * c)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with separate 2-D q, k, v and output projections."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, dtype=None):
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}).")
        self.num_heads = heads
        self.query = linear(dim, dim, dtype=dtype, rngs=rngs)
        self.key = linear(dim, dim, dtype=dtype, rngs=rngs)
        self.value = linear(dim, dim, dtype=dtype, rngs=rngs)
        self.out = linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[b, n, dim] -> [b, n, dim]."""
        b, n, dim = x.shape

        def split_heads(t: jax.Array) -> jax.Array:
            return t.reshape(b, n, self.num_heads, dim // self.num_heads)

        q, k, v = split_heads(self.query(x)), split_heads(self.key(x)), split_heads(self.value(x))
        attended = jax.nn.dot_product_attention(q, k, v)
        return self.out(attended.reshape(b, n, dim))


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden_dim: int, *, rngs: nnx.Rngs, dtype=None):
        self.fc1 = linear(dim, hidden_dim, dtype=dtype, rngs=rngs)
        self.fc2 = linear(hidden_dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[b, n, dim] -> [b, n, dim]."""
        return self.fc2(nnx.gelu(self.fc1(x)))


class TransformerBlock(nnx.Module):
    """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype=None):
        self.norm1 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.attn = SelfAttention(dim, heads, rngs=rngs, dtype=dtype)
        self.norm2 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.mlp = MLP(dim, mlp_dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[b, n, dim] -> [b, n, dim]."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nnx.Module):
    """ViT with a Linear patch embedding, learned position embedding and mean-pooled tokens.

    Every weight is a 2-D dense kernel (biases and LayerNorm parameters are 1-D). The position
    embedding, [(image_size / patch_size) ** 2, dim], is bilinearly resized when the input's
    patch grid differs from the one it was built for. Input [b, h, w, in_channels] with h and w
    divisible by `patch_size`, output logits [b, num_classes]. `dtype` (e.g. `jnp.bfloat16`)
    is the dtype every layer computes in; params stay float32.
    """

    def __init__(
        self,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_dim: int = 768,
        image_size: int = 32,
        *,
        num_classes: int,
        in_channels: int = 3,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch_size.")
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.patch_embed = linear(
            patch_size * patch_size * in_channels, dim, dtype=dtype, rngs=rngs
        )
        init = nnx.initializers.normal(stddev=0.02)
        self.pos_embed = nnx.Param(init(rngs.params(), (self.grid_size**2, dim)))
        self.blocks = nnx.List(
            [TransformerBlock(dim, heads, mlp_dim, rngs=rngs, dtype=dtype) for _ in range(depth)]
        )
        self.norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.head = linear(dim, num_classes, dtype=dtype, rngs=rngs)

    def position_embedding(self, grid_h: int, grid_w: int) -> jax.Array:
        """[grid_h * grid_w, dim], resized from the learned grid when the shapes differ."""
        pos = self.pos_embed[...]
        if (grid_h, grid_w) == (self.grid_size, self.grid_size):
            return pos
        dim = pos.shape[-1]
        grid = pos.reshape(self.grid_size, self.grid_size, dim)
        return jax.image.resize(grid, (grid_h, grid_w, dim), "bilinear").reshape(-1, dim)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[b, h, w, in_channels] -> [b, num_classes]."""
        del train
        grid_h, grid_w = x.shape[1] // self.patch_size, x.shape[2] // self.patch_size
        tokens = self.patch_embed(patchify(x, self.patch_size))
        tokens = tokens + self.position_embedding(grid_h, grid_w).astype(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(jnp.mean(self.norm(tokens), axis=1))
