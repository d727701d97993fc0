"""Change a trained model's architecture while keeping what it has learnt (``codec train reshape``).

Training compute is scarce, so an architecture candidate should start from the trained model, not
from scratch. These changes are supported:

* **Deeper transforms** (``depths``): every level of g_a, g_s and the hyper transforms keeps its
  trained RWKV blocks in order, and the new blocks are appended at the end of their level with
  ``gamma1 = gamma2 = 0``. A block computes ``x + gamma * f(x)``, so the new model computes exactly
  what the old one did (function preserving, as in Net2Net); training then grows the new blocks.
* **Residual units** (``units``): convolution units (:class:`~lalic_codec.models.layers.ResidualUnit`)
  appended at the 1/2 level of g_a and of g_s, after that level's blocks, their second
  convolution zero: function preserving too. They add the nonlinearity that level lacks when it
  has no RWKV block (the default model's), at about 1/14 of a block's cost.
* **Latent residual prediction** (``lrp``): after each channel group, a small network predicts the
  group's quantisation residual from the support its parameters came from
  (:class:`~lalic_codec.models.layers.LatentResidualPrediction`, Minnen and Singh 2020), its last
  convolution zero: function preserving. It gives the dequantised latent, and so g_s and the later
  groups' context, what the hyper side information knows.
* **A leaner channel context** (``ctx_hidden_rate``): the channel-mix layers of the channel
  context's RWKV blocks keep the hidden units that matter most. A unit j contributes
  ``value[:, j] * relu(key_j . x)^2`` on layer-normed inputs, so its weight is taken as
  ``|key_j|^2 |value[:, j]|``. This is not function preserving; a short fine-tune recovers it.
* **Leaner parameter networks** (``param_hidden_rate``): the same pruning for the hidden layers of
  the parameter networks' blocks, which compute ``sigmoid(r) * value(relu(key(LN x))^2)`` too
  (official: 2 x their output width). Together with a wider latent it keeps the weights file small.
* **Another quality ladder** (``lambdas``): the eight rate-distortion trade-offs change (say to
  span more bit rates), and each channel's latent gain and inverse gain are carried over as
  functions of log lambda: interpolated between the trained levels, and beyond them extended along
  the channel's least-squares slope over all levels (about 0.5, as high-rate theory has it). The
  integer scale path sees the quality number, whose meaning changes, so training must follow.
* **A wider latent** (``latent``): M grows by one channel group, coded last. g_a's last convolution
  gets new output rows (random, at half the trained rows' size), g_s's first and h_a's first layers get zero
  weights for the new channels, so the reconstruction and z are exactly the old ones; only the
  new group's rate is added. The entropy model keeps its trained width (``side_width``: h_s's
  output and the channel context stay at the old M); the new group's context, parameter network
  and integer-path layers start fresh, its gains at the mean of the old channels'. The
  transforms' ceiling (``benchmarks/bench_transform_ceiling.py``) is what this raises.

  Two informed starts for it, so that the new channels carry information, and cost no more
  than they must, from the first step (``codec train reshape --latent M --latent-init pca
  --new-group last``):

  - **Innovation components** (``patch_stats``): the new analysis rows are the principal
    components of what the old rows leave out. With ``p`` the input patches of g_a's last
    convolution (mean and covariance ``S`` over training crops, :func:`analysis_patch_stats`) and
    ``W`` its trained rows, the part of ``p`` that ``W p`` does not predict linearly is ``P p``,
    ``P = I - S W^T (W S W^T)^-1 W``; its covariance's leading eigenvectors ``u`` give the rows
    ``P^T u``. The new channels are then uncorrelated with the old ones on the data and hold as
    much of the rest as that many linear rows can; centred (their bias), at the typical size of
    the last old group's channels.
  - **The last group's networks** (``new_group="last"``): the new group's channel context,
    parameter network, spatial context and integer-path layers start as copies of the last old
    group's (of the same width), with zero weights on the inputs the copies never saw (that
    group's own channels) and the predicted means at zero; the new channels' gains are that
    group's mean gains. The new group's latent residual prediction still starts as the identity.

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


def _roles(depths, levels, prefix: str, units=(0, 0)) -> list[tuple]:
    """Role of each index of a transform Sequential: ("conv", j), ("block", level, b) or ("unit", b)
    (the residual units after the 1/2 level's blocks: ``units`` = (g_a's, g_s's))."""
    n_units = {"g_a.": units[0], "g_s.": units[1]}.get(prefix, 0)
    roles = [("conv", 0)]
    for j, lv in enumerate(levels):
        roles += [("block", lv, b) for b in range(depths[lv])]
        if lv == 0:
            roles += [("unit", b) for b in range(n_units)]
        roles.append(("conv", j + 1))
    return roles


def _source_key(key: str, old_depths, new_depths, old_units=(0, 0), new_units=(0, 0)) -> tuple[str | None, bool]:
    """(the old model's key for this key of the reshaped model or None, whether it is a new block's)."""
    for prefix, levels in _TRANSFORMS.items():
        m = re.match(re.escape(prefix) + r"(\d+)\.(.*)", key)
        if m:
            role = _roles(new_depths, levels, prefix, new_units)[int(m[1])]
            old = _roles(old_depths, levels, prefix, old_units)
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


def _prune_all(sd: dict, pattern: str, hidden_of) -> None:
    """Prune every channel mix whose prefix matches ``pattern`` (ending before ``key.weight``) to
    ``hidden_of(prefix)`` units (in place)."""
    rx = re.compile(f"({pattern})key\\.weight")
    for k in [k for k in sd if rx.fullmatch(k)]:
        prefix = rx.fullmatch(k)[1]
        _prune_channel_mix(sd, prefix, hidden_of(prefix))


def model_kwargs(sd: dict) -> dict:
    """Constructor arguments of :class:`VariableRateLALIC` for the architecture ``sd`` holds."""
    from .models.int_scale import IntegerScalePath

    cfg = LALIC.config_from_state_dict(sd)
    int_scale = IntegerScalePath.config_from_state_dict(sd) if any(k.startswith("scale_path.") for k in sd) else False
    return dict(N=cfg.N, M=cfg.M, dims=tuple(cfg.dims), depths=tuple(cfg.depths), groups=tuple(cfg.groups),
                ctx_hidden_rate=cfg.ctx_hidden_rate, side_width=cfg.side_width, param_hidden_rate=cfg.param_hidden_rate,
                units=tuple(cfg.units), lrp=cfg.lrp, int_scale=int_scale)


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


#: root-mean-square of the new latent channels' analysis weights, relative to the trained ones'.
#: Not zero, so that synthesis sees the new channels and learns to use them: its gradient is
#: proportional to them. 0.1 of a fresh layer's (about 0.005 of the trained rows') left them
#: unused after 25 minutes of training; half the trained rows' makes them real signals from the start.
NEW_LATENT_SCALE = 0.5


def _new_group_source(key: str, k: int, warm: bool = False) -> str | None:
    """For a tensor of the new channel group ``k``: the key it copies (the shared CDF tables of
    group 0; with ``warm`` the last old group's tensor, but for the residual prediction), or None
    where it starts fresh; the key itself where it is not the new group's."""
    for pattern in (rf"latent_codec\.y\.(latent_codec|channel_context|residual_prediction)\.y{k}\.", rf"scale_path\.(channel_ctx|spatial_ctx|heads)\.{k}\."):
        if re.match(pattern, key):
            if ".gaussian_conditional." in key:
                return key.replace(f".y{k}.", ".y0.", 1)
            if warm and not key.startswith("latent_codec.y.residual_prediction."):
                return re.sub(rf"^(latent_codec\.y\.\w+\.y|scale_path\.\w+\.){k}\.", rf"\g<1>{k - 1}.", key)
            return None
    return key


def _grow_inputs(old: torch.Tensor, fresh: torch.Tensor, planes: int) -> torch.Tensor:
    """``old`` (out, planes * a, ...) in a zero tensor of ``fresh``'s shape (out, planes * b, ...),
    b >= a: each of the ``planes`` blocks of input channels keeps its first ``a`` channels."""
    a, b = old.shape[1] // planes, fresh.shape[1] // planes
    if old.shape[0] != fresh.shape[0] or old.shape[2:] != fresh.shape[2:] or a * planes != old.shape[1] or b * planes != fresh.shape[1] or b < a:
        raise ValueError(f"cannot grow the inputs of shape {tuple(old.shape)} to {tuple(fresh.shape)}")
    out = torch.zeros_like(fresh)
    for i in range(planes):
        out[:, i * b : i * b + a] = old[:, i * a : (i + 1) * a]
    return out


@torch.no_grad()
def analysis_patch_stats(model, x: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance), float64, of the input patches of ``model``'s last analysis convolution
    over the crops ``x`` (n, 3, H, W) in [0, 1]: the vectors that convolution maps to y's channels
    (flattened as its weight is: channel, row, column)."""
    last, head = model.g_a[-1], model.g_a[:-1]
    dtype = next(model.parameters()).dtype
    total, outer, count = 0, 0, 0
    for chunk in x.split(batch):
        f = head(chunk.to(dtype))
        p = torch.nn.functional.unfold(f, last.kernel_size, padding=last.padding, stride=last.stride)  # (b, D, L)
        p = p.transpose(1, 2).reshape(-1, p.shape[1]).double()
        total, outer, count = total + p.sum(0), outer + p.T @ p, count + len(p)
    mean = total / count
    return mean, outer / count - torch.outer(mean, mean)


def innovation_rows(weight: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, count: int, size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (count, ...) shaped as ``weight``'s, their bias (count,)): the leading principal
    components of the patches' part that the rows of ``weight`` do not predict (module docstring),
    scaled together so that the root-mean-square deviation of their outputs is ``size``."""
    W = weight.reshape(len(weight), -1).double()
    D = W.shape[1]
    if count > D - len(W):
        raise ValueError(f"{count} new channels: patches of {D} values leave {D - len(W)} directions beside the {len(W)} rows")
    A = W @ cov @ W.T
    A = A + 1e-9 * torch.trace(A) / len(A) * torch.eye(len(A), dtype=A.dtype)
    P = torch.eye(D, dtype=cov.dtype) - cov @ W.T @ torch.linalg.solve(A, W)
    res = P @ cov @ P.T
    values, vectors = torch.linalg.eigh((res + res.T) / 2)
    rows = (P.T @ vectors[:, values.argsort(descending=True)[:count]]).T  # row i on p gives u_i . P p
    spread = (rows @ cov * rows).sum(1).clamp_min(0).mean().sqrt()
    if not spread > 0:
        raise ValueError("the patches hold nothing beyond the present rows (degenerate statistics)")
    rows = rows * (size / spread)
    return rows.reshape(count, *weight.shape[1:]).to(weight.dtype), (-(rows @ mean)).to(weight.dtype)


def channel_spread(weight: torch.Tensor, cov: torch.Tensor, channels: slice) -> float:
    """Root-mean-square deviation of the outputs of ``weight``'s rows ``channels`` on patches of
    covariance ``cov``."""
    W = weight[channels].reshape(-1, cov.shape[0]).double()
    return float((W @ cov * W).sum(1).mean().sqrt())


def _widen(key: str, old: torch.Tensor, fresh: torch.Tensor, last_ga: str, gain_from: slice = slice(None),
           rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``old`` inside a tensor of the widened latent's shape ``fresh`` (see the module docstring);
    ``gain_from``: the old channels whose mean gains the new ones take; ``rows``: the new analysis
    rows and their bias (None: random rows at :data:`NEW_LATENT_SCALE`, no bias)."""
    if key in ("log_gain", "log_inv_gain"):
        grown = old[:, gain_from].mean(1, keepdim=True).expand(-1, fresh.shape[1] - old.shape[1])
        return torch.cat([old, grown], 1)
    if rows is not None and key in (last_ga + ".weight", last_ga + ".bias"):
        return torch.cat([old, rows[0] if key.endswith(".weight") else rows[1]])
    if key == last_ga + ".weight":
        out = fresh * (NEW_LATENT_SCALE * old.square().mean().sqrt() / fresh.square().mean().sqrt())
    elif key in (last_ga + ".bias", "g_s.0.weight", "latent_codec.hyper.h_a.0.weight"):
        out = torch.zeros_like(fresh)
    else:
        raise ValueError(f"{key}: shape {tuple(old.shape)}, expected {tuple(fresh.shape)}")
    out[tuple(slice(0, n) for n in old.shape)] = old
    return out


def reshape(sd: dict, depths=None, ctx_hidden_rate: int | None = None, seed: int = 0,
            lambdas=None, latent: int | None = None, param_hidden_rate: int | None = None, units=None,
            lrp: int | None = None, patch_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
            group_start: str = "fresh", origins: dict | None = None, names: list | None = None) -> tuple[dict, dict]:
    """(state dict, constructor arguments) of the reshaped model; ``sd`` is not modified.

    ``depths``: the new (L1, L2, L3, L4), each at least the old one; ``ctx_hidden_rate``: the new
    hidden width of the channel context's channel mix, in multiples of M, at most the old one;
    ``lambdas``: the new quality ladder (as many levels as the old one, increasing);
    ``latent``: the new latent width M, larger than the old one (one channel group is added);
    ``param_hidden_rate``: the parameter networks' new hidden width, in multiples of their output,
    at most the old one; ``units``: the new numbers of residual units at the 1/2 level of g_a and
    g_s, each at least the old one; ``lrp``: the hidden width of a latent residual prediction added
    after each channel group (the model must have none yet).

    With ``latent`` (module docstring): ``patch_stats``, the (mean, covariance) of
    :func:`analysis_patch_stats`, makes the new analysis rows the innovation components (None:
    random rows); ``group_start`` "last" starts the new group's networks as copies of the last
    old group's, "fresh" as new ones.

    ``origins``, where given, receives for each tensor copied unchanged the old key it copies;
    ``names``, where given, receives the new model's parameter names in the order of
    ``named_parameters()`` (an optimizer's order).
    """
    if group_start not in ("fresh", "last"):
        raise ValueError(f"group_start {group_start!r}: fresh or last")
    if (patch_stats is not None or group_start != "fresh") and latent is None:
        raise ValueError("patch_stats and group_start shape the channels a wider latent adds: give latent too")
    old = model_kwargs(sd)
    new = dict(old)
    side = old["side_width"] or old["M"]  # the entropy model's width (h_s output, channel context)
    for key, value, what, noun in (("depths", depths, "four levels", "blocks"), ("units", units, "two numbers (g_a, g_s)", "units")):
        if value is not None:
            value = tuple(int(v) for v in value)
            if len(value) != len(old[key]) or any(n < o for n, o in zip(value, old[key])):
                raise ValueError(f"{key} {value}: {what}, each at least the current {old[key]} ({noun} are only added)")
            new[key] = value
    for key, value in (("ctx_hidden_rate", ctx_hidden_rate), ("param_hidden_rate", param_hidden_rate)):
        if value is not None:  # hidden widths are only narrowed
            if not 1 <= value <= old[key]:
                raise ValueError(f"{key} {value}: between 1 and the current {old[key]}")
            new[key] = int(value)
    if lrp is not None:
        if old["lrp"]:
            raise ValueError(f"lrp {lrp}: the model has a latent residual prediction already (hidden width {old['lrp']})")
        if int(lrp) < 1:
            raise ValueError(f"lrp {lrp}: a hidden width of at least 1")
        new["lrp"] = int(lrp)
    if latent is not None:
        if int(latent) <= old["M"]:
            raise ValueError(f"latent {latent}: more than the current M = {old['M']} (channels are only added)")
        dims = list(old["dims"])
        dims[3] = int(latent)
        new.update(M=int(latent), dims=tuple(dims), groups=tuple(old["groups"]) + (int(latent) - old["M"],),
                   side_width=side)
        if group_start == "last" and old["groups"][-1] != new["groups"][-1]:
            raise ValueError(f"latent {latent}: the new group of {new['groups'][-1]} channels cannot start as a copy of "
                             f"the last group of {old['groups'][-1]}")
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
        _prune_all(src, r"latent_codec\.y\.channel_context\.y\d+\.\d+\.ffn\.", lambda prefix: new["ctx_hidden_rate"] * side)
    if new["param_hidden_rate"] != old["param_hidden_rate"]:
        _prune_all(src, r"latent_codec\.y\.latent_codec\.y\d+\.entropy_parameters\.\d+\.",
                   lambda prefix: new["param_hidden_rate"] * src[prefix + "mix.weight"].shape[0])
    torch.manual_seed(seed)
    model = VariableRateLALIC(**new, lambdas=tuple(src["lambdas"].tolist()))
    template = model.state_dict()
    params = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    if names is not None:
        names.extend(k for k, _ in model.named_parameters())
    out, used = {}, set()
    new_group = len(old["groups"]) if len(new["groups"]) > len(old["groups"]) else None
    last_ga = "g_a.%d" % (len(_roles(new["depths"], _TRANSFORMS["g_a."], "g_a.", new["units"])) - 1)
    warm = group_start == "last"
    last_group = slice(old["M"] - old["groups"][-1], old["M"])  # the last old group's channels
    rows = None
    if patch_stats is not None:
        old_last = src[_source_key(last_ga + ".weight", old["depths"], new["depths"], old["units"], new["units"])[0]]
        rows = innovation_rows(old_last, *patch_stats, new["M"] - old["M"], channel_spread(old_last, patch_stats[1], last_group))
    signed = bool(old["int_scale"]) and old["int_scale"]["signed"]
    for key, fresh in template.items():
        source, is_new_block = _source_key(key, old["depths"], new["depths"], old["units"], new["units"])
        if new_group is not None and source is not None:
            copied = _new_group_source(source, new_group, warm)
            is_new_block = copied is None
            if warm and copied not in (None, source) and ".gaussian_conditional." not in copied:
                value = src[copied]
                if value.shape != fresh.shape:  # a first layer that sees one more group's channels
                    value = _grow_inputs(value, fresh, 2 if signed and key.startswith("scale_path.channel_ctx.") else 1)
                out[key] = value.clone()
                used.add(copied)
                continue
            source = copied
        if source is not None and source.startswith("latent_codec.y.residual_prediction.") and not old["lrp"]:
            is_new_block = True  # a new residual prediction: its second convolution is zero already
        if is_new_block:  # an RWKV block's gammas are zero, a unit's second convolution is zero already
            out[key] = torch.zeros_like(fresh) if key.endswith((".gamma1", ".gamma2")) else fresh
            continue
        if source not in src and source.startswith(("h_a.", "h_s.")):  # files keep one copy of the aliases
            source = "latent_codec.hyper." + source
        if source not in src:
            raise ValueError(f"the model has no tensor {source!r}")
        if key in params and src[source].shape != fresh.shape:  # buffers (CDF tables) may have any size
            if new_group is None:
                raise ValueError(f"{source}: shape {tuple(src[source].shape)}, expected {tuple(fresh.shape)}")
            out[key] = _widen("latent_codec.hyper." + key if key.startswith(("h_a.", "h_s.")) else key, src[source], fresh, last_ga,
                              gain_from=last_group if warm else slice(None), rows=rows)
        else:
            out[key] = src[source].clone()
            if origins is not None:
                origins[key] = source
        used.add(source)
    if warm:  # the copied parameter network predicts the last group's means: the new group's start at zero
        prefix = f"latent_codec.y.latent_codec.y{new_group}.entropy_parameters."
        last = max(int(k[len(prefix):].split(".")[0]) for k in out if k.startswith(prefix))
        g = new["groups"][-1]
        for name in ("mix.weight", "mix.bias", "value.weight"):
            out[f"{prefix}{last}.{name}"][g:] = 0
    left = sorted(set(src) - used)
    if left:
        raise ValueError(f"{len(left)} tensors have no place in the reshaped model, e.g. {left[0]}")
    return out, new


def reshape_run(state: dict, patch_stats_of=None, **kw) -> dict:
    """A training run's checkpoint (``codec train run``) with another architecture, to resume: the
    weights and their moving average reshaped alike (``kw`` as :func:`reshape`; ``patch_stats_of``,
    if given, maps a state dict to its ``patch_stats``), the Adam moments kept for every parameter
    copied unchanged (the others, new or grown, start fresh), the step, samples and totals as
    they were. A restart from the weights alone loses the optimizer's state, which a kept run
    trains on from far better (model card, "What was tried")."""
    if not all(k in state for k in ("model", "config", "optimizer")):
        raise ValueError("not the checkpoint of a training run (no model, config or optimizer state)")
    origins: dict = {}
    names: list = []
    model_sd, _ = reshape(state["model"], patch_stats=patch_stats_of(state["model"]) if patch_stats_of else None, origins=origins,
                          names=names, **kw)
    out = {**state, "model": model_sd, "config": {**state["config"], "arch": model_kwargs(model_sd)}}
    if "ema" in state:
        avg = {**state["model"], **state["ema"]}
        avg_sd, _ = reshape(avg, patch_stats=patch_stats_of(avg) if patch_stats_of else None, **kw)
        out["ema"] = {n: avg_sd[n].float() for n in names}
    opt = state["optimizer"]
    if not all("names" in g for g in opt["param_groups"]):
        raise ValueError("the run's optimizer state does not name its parameters (an older checkpoint)")
    old_names = [n for g in opt["param_groups"] for n in g["names"]]
    moments = {n: opt["state"][i] for i, n in enumerate(old_names) if i in opt["state"]}
    kept = [n for n in names if origins.get(n) in moments and state["model"][origins[n]].shape == model_sd[n].shape]
    group = {k: v for k, v in opt["param_groups"][0].items() if k not in ("names", "params")}
    out["optimizer"] = {"state": {i: moments[origins[n]] for i, n in enumerate(kept)},
                        "param_groups": [{**group, "names": kept, "params": list(range(len(kept)))}]}
    return out
