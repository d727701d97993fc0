"""Change a trained model's architecture while keeping what it has learnt (``codec train reshape``).

Training compute is scarce, so an architecture candidate should start from the trained model, not
from scratch. Two changes are supported:

* **Deeper transforms** (``depths``): every level of g_a, g_s and the hyper transforms keeps its
  trained RWKV blocks in order, and the new blocks are appended at the end of their level with
  ``gamma1 = gamma2 = 0``. A block computes ``x + gamma * f(x)``, so the new model computes exactly
  what the old one did (function preserving, as in Net2Net); training then grows the new blocks.
* **A leaner channel context** (``ctx_hidden_rate``): the channel-mix layers of the channel
  context's RWKV blocks keep the hidden units that matter most. A unit j contributes
  ``value[:, j] * relu(key_j . x)^2`` on layer-normed inputs, so its weight is taken as
  ``|key_j|^2 |value[:, j]|``. This is not function preserving; a short fine-tune recovers it.
* **Another quality ladder** (``lambdas``): the eight rate-distortion trade-offs change (say to
  span more bit rates), and each channel's latent gain and inverse gain are carried over as
  functions of log lambda: interpolated between the trained levels, and beyond them extended along
  the channel's least-squares slope over all levels (about 0.5, as high-rate theory has it). The
  integer scale path sees the quality number, whose meaning changes, so training must follow.

Everything else (latent gains, integer scale path, entropy models, CDF tables) is copied.
"""

from __future__ import annotations

import re

import torch

from .models.lalic import LALIC, VariableRateLALIC

#: the Sequential transforms, and the order in which their levels' depths appear (depths index)
_TRANSFORMS = {
    "g_a.": (0, 1, 2),
    "g_s.": (2, 1, 0),
    "h_a.": (3,),
    "h_s.": (3,),
    "latent_codec.hyper.h_a.": (3,),
    "latent_codec.hyper.h_s.": (3,),
}


def _roles(depths, levels) -> list[tuple]:
    """Role of each index of a transform Sequential: ("conv", j) or ("block", level, b)."""
    roles = [("conv", 0)]
    for j, lv in enumerate(levels):
        roles += [("block", lv, b) for b in range(depths[lv])]
        roles.append(("conv", j + 1))
    return roles


def _source_key(key: str, old_depths, new_depths) -> tuple[str | None, bool]:
    """(the old model's key for this key of the reshaped model or None, whether it is a new block's)."""
    for prefix, levels in _TRANSFORMS.items():
        m = re.match(re.escape(prefix) + r"(\d+)\.(.*)", key)
        if m:
            role = _roles(new_depths, levels)[int(m[1])]
            old = _roles(old_depths, levels)
            if role in old:
                return f"{prefix}{old.index(role)}.{m[2]}", False
            return None, True
    return key, False


def _prune_channel_mix(sd: dict, prefix: str, hidden: int) -> None:
    """Keep the ``hidden`` most important units of the channel mix at ``prefix`` (in place)."""
    key, value = sd[prefix + "key.weight"], sd[prefix + "value.weight"]  # (H, C), (C, H)
    weight = key.float().square().sum(1) * value.float().norm(dim=0)
    keep = torch.topk(weight, hidden).indices.sort().values
    sd[prefix + "key.weight"] = key[keep].clone()
    sd[prefix + "value.weight"] = value[:, keep].clone()


def model_kwargs(sd: dict) -> dict:
    """Constructor arguments of :class:`VariableRateLALIC` for the architecture ``sd`` holds."""
    from .models.int_scale import IntegerScalePath

    cfg = LALIC.config_from_state_dict(sd)
    int_scale = IntegerScalePath.config_from_state_dict(sd) if any(k.startswith("scale_path.") for k in sd) else False
    return dict(N=cfg.N, M=cfg.M, dims=tuple(cfg.dims), depths=tuple(cfg.depths), groups=tuple(cfg.groups),
                ctx_hidden_rate=cfg.ctx_hidden_rate, int_scale=int_scale)


def ladder(lo: float, hi: float, levels: int = 8) -> tuple[float, ...]:
    """``levels`` lambdas spaced geometrically from ``lo`` to ``hi`` (6 significant digits)."""
    if not 0 < lo < hi:
        raise ValueError(f"lambdas {lo:g},{hi:g}: need 0 < low < high")
    return tuple(float(f"{lo * (hi / lo) ** (i / (levels - 1)):.6g}") for i in range(levels))


def regain(table: torch.Tensor, old_lambdas, new_lambdas) -> torch.Tensor:
    """A (levels, M) table of per-channel log gains, re-sampled at ``new_lambdas``.

    Linear in log lambda between the old levels; outside them, the channel's least-squares line
    through all old levels, shifted to meet the end level."""
    x = torch.log(torch.as_tensor(old_lambdas, dtype=torch.float64))
    t = table.double()
    xc = x - x.mean()
    slope = (xc[:, None] * (t - t.mean(0))).sum(0) / xc.square().sum()
    rows = []
    for lam in torch.log(torch.as_tensor(new_lambdas, dtype=torch.float64)):
        if lam <= x[0]:
            rows.append(t[0] + slope * (lam - x[0]))
        elif lam >= x[-1]:
            rows.append(t[-1] + slope * (lam - x[-1]))
        else:
            i = int(torch.searchsorted(x, lam)) - 1
            f = (lam - x[i]) / (x[i + 1] - x[i])
            rows.append((1 - f) * t[i] + f * t[i + 1])
    return torch.stack(rows).to(table.dtype)


def reshape(sd: dict, depths=None, ctx_hidden_rate: int | None = None, seed: int = 0,
            lambdas=None) -> tuple[dict, dict]:
    """(state dict, constructor arguments) of the reshaped model; ``sd`` is not modified.

    ``depths``: the new (L1, L2, L3, L4), each at least the old one; ``ctx_hidden_rate``: the new
    hidden width of the channel context's channel mix, in multiples of M, at most the old one;
    ``lambdas``: the new quality ladder (as many levels as the old one, increasing).
    """
    old = model_kwargs(sd)
    new = dict(old)
    if depths is not None:
        depths = tuple(int(d) for d in depths)
        if len(depths) != 4 or any(n < o for n, o in zip(depths, old["depths"])):
            raise ValueError(f"depths {depths}: four levels, each at least the current {old['depths']} (blocks are only added)")
        new["depths"] = depths
    if ctx_hidden_rate is not None:
        if not 1 <= ctx_hidden_rate <= old["ctx_hidden_rate"]:
            raise ValueError(f"ctx_hidden_rate {ctx_hidden_rate}: between 1 and the current {old['ctx_hidden_rate']}")
        new["ctx_hidden_rate"] = int(ctx_hidden_rate)
    src = dict(sd)
    old_lambdas = tuple(sd["lambdas"].tolist())
    if lambdas is not None:
        lambdas = tuple(float(v) for v in lambdas)
        if len(lambdas) != len(old_lambdas) or any(b <= a for a, b in zip(lambdas, lambdas[1:])) or lambdas[0] <= 0:
            raise ValueError(f"lambdas: {len(old_lambdas)} increasing positive values, got {len(lambdas)}")
        src["lambdas"] = torch.tensor(lambdas, dtype=sd["lambdas"].dtype)
        for k in ("log_gain", "log_inv_gain"):
            src[k] = regain(sd[k], old_lambdas, lambdas)
    if new["ctx_hidden_rate"] != old["ctx_hidden_rate"]:
        rx = re.compile(r"(latent_codec\.y\.channel_context\.y\d+\.\d+\.ffn\.)key\.weight")
        for k in [k for k in src if rx.fullmatch(k)]:
            _prune_channel_mix(src, rx.fullmatch(k)[1], new["ctx_hidden_rate"] * new["M"])
    torch.manual_seed(seed)
    model = VariableRateLALIC(**new, lambdas=tuple(src["lambdas"].tolist()))
    template = model.state_dict()
    params = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    out, used = {}, set()
    for key, fresh in template.items():
        source, is_new_block = _source_key(key, old["depths"], new["depths"])
        if is_new_block:
            out[key] = torch.zeros_like(fresh) if key.endswith((".gamma1", ".gamma2")) else fresh
            continue
        if source not in src and source.startswith(("h_a.", "h_s.")):  # files keep one copy of the aliases
            source = "latent_codec.hyper." + source
        if source not in src:
            raise ValueError(f"the model has no tensor {source!r}")
        if key in params and src[source].shape != fresh.shape:  # buffers (CDF tables) may have any size
            raise ValueError(f"{source}: shape {tuple(src[source].shape)}, expected {tuple(fresh.shape)}")
        out[key] = src[source].clone()
        used.add(source)
    left = sorted(set(src) - used)
    if left:
        raise ValueError(f"{len(left)} tensors have no place in the reshaped model, e.g. {left[0]}")
    return out, new
