"""The vector-quantisation layer of a VQ-VAE (van den Oord et al. 2017) over `diffusion_jax.quantization`.

    vq = VectorQuantizer(num_codes=512, dim=64, beta=0.25)                   # codebook learned by the loss
    vq = VectorQuantizer(num_codes=512, dim=64, ema_decay=0.99, dead_after=100)   # EMA codebook
    variables = vq.init(key, z)                                # z (..., dim)
    z_st, aux = vq.apply(variables, z)                         # eval: no state change
    (z_st, aux), upd = vq.apply(variables, z, train=True, mutable=['vq_stats'], rngs={'vq': key})

z_st: the straight-through quantised latents (forward the codes, gradient the identity into z);
aux: {'indices', 'loss' (codebook + commitment terms to add to the objective: with EMA only the
commitment), 'commitment_loss', 'codebook_loss', 'perplexity', 'usage'}. With ema_decay the codebook
lives in the 'vq_stats' collection (cluster_size, embed_sum, codebook, unused; `quantization.VQEMAState`)
and is updated by `quantization.ema_step` on train=True calls that make 'vq_stats' mutable; dead codes
(unused for `dead_after` updates) restart from random z of the batch (rng stream 'vq').
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax import quantization as Q


class VectorQuantizer(nn.Module):
    num_codes: int
    dim: int
    beta: float = 0.25
    ema_decay: Optional[float] = None
    eps: float = 1e-5
    dead_after: Optional[int] = None

    def _init_codebook(self, key):
        k = self.num_codes
        return jax.random.uniform(key, (k, self.dim), jnp.float32, -1.0 / k, 1.0 / k)

    @nn.compact
    def __call__(self, z, train: bool = False):
        if self.num_codes < 1 or self.dim < 1:
            raise ValueError(f"VectorQuantizer needs num_codes >= 1 and dim >= 1, got {self.num_codes}, {self.dim}")
        if z.shape[-1] != self.dim:
            raise ValueError(f"VectorQuantizer: codebook embedding dim {self.dim} does not match the encoder "
                             f"output's last axis {z.shape[-1]} (z shape {tuple(z.shape)})")
        z = jnp.asarray(z, jnp.float32)
        if self.ema_decay is None:
            codebook = self.param("codebook", self._init_codebook)
            out = Q.quantize(z, codebook, beta=self.beta)
            loss = out.codebook_loss + out.commitment_loss
        else:
            init = self.is_initializing()
            st = Q.init_ema_state(self._init_codebook(self.make_rng("params"))) if init else None
            names = Q.VQEMAState._fields
            v = {n: self.variable("vq_stats", n, lambda n=n: getattr(st, n)) for n in names}
            state = Q.VQEMAState(*(v[n].value for n in names))
            out = Q.quantize(z, jax.lax.stop_gradient(state.codebook), beta=self.beta)
            loss = out.commitment_loss
            if train and not init and self.is_mutable_collection("vq_stats"):
                key = self.make_rng("vq") if self.dead_after is not None else None
                new = Q.ema_update(state, jax.lax.stop_gradient(z), out.indices, decay=self.ema_decay,
                                   eps=self.eps)
                if self.dead_after is not None:
                    new, _ = Q.restart_dead_codes(new, jax.lax.stop_gradient(z), key, dead_after=self.dead_after)
                for n in names:
                    v[n].value = getattr(new, n)
        aux = {"indices": out.indices, "loss": loss, "commitment_loss": out.commitment_loss,
               "codebook_loss": out.codebook_loss, "perplexity": out.perplexity, "usage": out.usage}
        return out.z_st, aux
