"""``NALoRAController``: NA-LoRA's training-time mechanisms on top of a plain peft LoRA model.

How it rides on an ordinary training loop (NALORA.md, mechanisms 1 and 2):

* Statistics: on the forward of every ``mask_interval``-th optimiser step only, forward hooks on the
  gate (and up) modules accumulate, per gate channel, ``sum |phi'(g) u|`` (or ``|phi'(g)|``) and the
  regime counts over real tokens. Other forwards cost one Python flag check per hook.
* Under ``torch.compile`` the hooks stay installed (``compile_ready``) and put one opaque op per hook into
  the graph (``nalora::tap``): at run time it hands the detached output to the same eager statistics code
  on refresh steps and returns at once otherwise. The graph then never depends on the step, so the compiled
  model builds the same graphs as plain LoRA (hooks that come and go, or a Python flag read in the graph,
  are dynamo guards: each state compiles its own graphs).
* Which channels a refresh keeps is ``config.mask_selection``: the top ``rho(t) d_ff`` of the importance
  EMA (NA-LoRA), a uniform random draw (control), or the top of the ranking frozen at t_w (control).
* The mask is applied *in place*: the B rows (or A_down columns) of masked channels hold zero, their
  trained values are stashed, and they come back from the stash when the channel is kept again. So the
  adapter parameters always equal ``diag(m) B`` and the forward needs no extra multiply.
* Around ``optimizer.step()`` (step pre/post hooks, ``nalora.rescale.StepRescaler``) the changed rows are
  snapshot and rewritten:
  masked rows and their optimiser state (Adam moments, momentum) are restored exactly, and the change
  of each kept ``B_gate`` row is multiplied by ``gamma_c``.
* Everything stays on device; nothing synchronises with the host except ``history()`` (and, under data
  parallelism, the cross-rank sum of the statistics on refresh steps, which keeps every replica's mask equal).
"""

from __future__ import annotations

import inspect
import itertools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nalora.activations import dphi, has_partition, normalize_activation, regime_thresholds
from nalora.config import NALoRAConfig
from nalora.rescale import Slot, StepRescaler, lora_weight, row_index
from nalora.schedule import keep_count, keep_fraction, warmup_over


@dataclass
class _Unit:
    """One controlled gated FFN: its modules, statistics and current channel mask."""

    name: str
    act: str
    d_ff: int
    layout: str
    gate: nn.Module
    up: nn.Module | None
    gate_rows: slice | None
    up_rows: slice | None
    chunk_dim: int
    thresholds: tuple[float, float] | None  # (z_min, z_lin) where the activation has a partition
    gammas: torch.Tensor | None  # (3,) when step scaling applies to this unit
    keep: torch.Tensor  # (d_ff,) bool
    k: int
    importance: torch.Tensor | None = None  # EMA I_c
    occupancy: torch.Tensor | None = None  # EMA p_c, (d_ff, 3)
    gamma: torch.Tensor | None = None  # (d_ff,)
    ranking: torch.Tensor | None = None  # mask_selection "static": channel order frozen at t_w
    acc: dict[str, Any] = field(default_factory=dict)
    pending: dict[str, torch.Tensor] = field(default_factory=dict)
    tap_key: torch.Tensor | None = None  # (controller serial, unit index) on the CPU: nalora::tap's argument


# ---------------------------------------------------------------- compiled statistics taps
# A statistics hook traced by dynamo calls ``nalora::tap(x, key, role)``: an op that dynamo and AOT autograd
# do not trace into, so the graph holds one opaque call per hook and reads no Python state of the controller
# (no guard). At run time the op finds the controller and unit from ``key`` (a CPU tensor, a graph input like
# any other, so every layer shares one graph) and runs the eager statistics code on refresh steps only.
_TAP_MASK, _TAP_GATE, _TAP_UP = 0, 1, 2
_TAPPED: weakref.WeakValueDictionary[int, NALoRAController] = weakref.WeakValueDictionary()
_SERIALS = itertools.count()


def _tap_impl(x: torch.Tensor | None, key: torch.Tensor, role: int) -> None:
    serial, index = key.tolist()
    ctrl = _TAPPED.get(serial)
    if ctrl is not None:
        ctrl._tapped(index, role, x)


def _define_tap() -> Any:
    if not hasattr(torch.ops.nalora, "tap"):  # a module reload must not define it twice
        lib = torch.library.Library("nalora", "DEF")
        lib.define("tap(Tensor? x, Tensor key, int role) -> ()")
        lib.impl("tap", _tap_impl, "CompositeExplicitAutograd")
        torch.library.register_fake("nalora::tap", lambda x, key, role: None, lib=lib)
        _define_tap.lib = lib  # the registrations live as long as the Library object
    op = torch.ops.nalora.tap.default
    torch.fx.node.has_side_effect(op)  # it returns nothing: without this the graph would drop it
    return op


_TAP = _define_tap()


def compile_ready(model: nn.Module) -> int:
    """Before ``model`` (or blocks of it) is compiled: the NA-LoRA controllers of ``model`` keep their
    statistics hooks installed from now on (``NALoRAController.keep_hooks``); returns how many."""
    ids = {id(m) for m in model.modules()}
    found = [c for c in list(_TAPPED.values()) if id(c.model) in ids and not c.folded]
    for c in found:
        c.keep_hooks()
    return len(found)


def _jacobian(act: str, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``phi'(g) * v``; one fused kernel (autograd's own backward) where torch has one."""
    if act == "silu":
        return torch.ops.aten.silu_backward(v, g)
    if act in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward(v, g, approximate="none" if act == "gelu" else "tanh")
    return dphi(act, g) * v


class NALoRAController(StepRescaler):
    """NA-LoRA's mask, step scaling and statistics for the gated FFNs ``ffns`` of ``peft_model``.

    ``ffns``: ``GatedFFN`` records whose module paths are relative to the base model (as from
    ``nalora.discovery``); each gate must carry a LoRA adapter ``adapter_name``. ``total_steps``
    (optimiser steps of the run) drives the keep-fraction schedule; required when ``config.mask``.
    """

    def __init__(
        self,
        peft_model: nn.Module,
        ffns: Sequence[Any],
        config: NALoRAConfig | None = None,
        *,
        adapter_name: str = "default",
        total_steps: int | None = None,
    ) -> None:
        self.model = peft_model
        self.config = config or NALoRAConfig()
        self.adapter_name = adapter_name
        self.total_steps = self._check_steps(total_steps)
        if not ffns:
            raise ValueError("NALoRAController needs at least one gated FFN")
        base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
        self.units: list[_Unit] = [self._make_unit(base, f) for f in ffns]
        super().__init__(self._make_slots(base, ffns))
        # mask_selection "random": its own generator, seeded from the global seed at build (reproducible runs)
        self._generator = torch.Generator().manual_seed(torch.initial_seed() % 2**63)
        self._attn_pos = self._attention_mask_position(peft_model)
        self._attn: torch.Tensor | None = None
        self._attn_w: torch.Tensor | None = None  # the real-token weights of this forward, float32, flat
        self._attn_n: torch.Tensor | None = None  # their sum (the token count every FFN of this forward shares)
        self.step = 0  # optimiser steps taken so far
        self._collect = True  # the next forward(s) belong to a statistics step
        self._stat_handles: list[Any] = []
        self._hooks_stay = False  # keep_hooks(): statistics hooks stay between refreshes (torch.compile)
        serial = next(_SERIALS)
        _TAPPED[serial] = self
        self._tap_key = torch.tensor([serial, -1])
        for i, u in enumerate(self.units):
            u.tap_key = torch.tensor([serial, i])
        self.stat_calls = 0  # statistics computations (tests check none happen off refresh steps)
        self._history: list[dict[str, Any]] = []
        self._register_forward_hooks()

    # ---------------------------------------------------------------- construction
    @staticmethod
    def _check_steps(total_steps: int | None) -> int | None:
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps <= 0):
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        return total_steps

    def _make_unit(self, base: nn.Module, f: Any) -> _Unit:
        try:
            act = normalize_activation(f.activation, strict=True)
        except ValueError as e:
            raise ValueError(f"gated FFN {f.name}: {e}") from None
        gate = base.get_submodule(f.gate)
        w = lora_weight(gate, self.adapter_name, "lora_B", f"gate {f.gate}")
        packed = f.layout == "packed"
        up = None
        if self.config.importance == "jacobian" and not packed:
            up = base.get_submodule(f.up)
        part = has_partition(act)
        thresholds = regime_thresholds(act, self.config.regime_tol) if part else None
        gammas = None
        if part and self.config.step_scaling:
            gammas = torch.tensor(self.config.gammas[act], dtype=torch.float32, device=w.device)
        return _Unit(
            name=f.name, act=act, d_ff=int(f.d_ff), layout=f.layout, gate=gate, up=up,
            gate_rows=f.gate_rows if packed else None, up_rows=f.up_rows if packed else None,
            chunk_dim=int(getattr(f, "chunk_dim", -1)), thresholds=thresholds, gammas=gammas,
            keep=torch.ones(int(f.d_ff), dtype=torch.bool, device=w.device), k=int(f.d_ff),
        )

    def _make_slots(self, base: nn.Module, ffns: Sequence[Any]) -> list[Slot]:
        slots: dict[int, Slot] = {}
        targets = self.config.mask_targets if self.config.mask else []

        def add(p: nn.Parameter, dim: int, unit: _Unit, idx: torch.Tensor, masked: bool, scaled: bool) -> None:
            if not (masked or scaled):
                return
            s = slots.get(id(p))
            if s is None:
                s = slots[id(p)] = Slot.new(p, dim, unit.name)
            s.entries.append((unit, idx.to(p.device), masked, scaled))
            s.scaled = s.scaled or scaled

        for u, f in zip(self.units, ffns):
            gate_b = lora_weight(u.gate, self.adapter_name, "lora_B", f"gate {f.gate}")
            add(gate_b, 0, u, row_index(u.gate_rows, u.d_ff, f.gate), "gate" in targets, u.gammas is not None)
            if "up" in targets:
                up_mod = u.gate if u.layout == "packed" else base.get_submodule(f.up)
                up_b = lora_weight(up_mod, self.adapter_name, "lora_B", f"up {f.up} (mask_targets has 'up')")
                add(up_b, 0, u, row_index(u.up_rows, u.d_ff, f.up), True, False)
            if "down" in targets:
                down_a = lora_weight(base.get_submodule(f.down), self.adapter_name, "lora_A",
                               f"down {f.down} (mask_targets has 'down')")
                if down_a.shape[1] != u.d_ff:
                    raise ValueError(f"down {f.down}: lora_A has {down_a.shape[1]} input columns, d_ff={u.d_ff}")
                add(down_a, 1, u, torch.arange(u.d_ff), True, False)
        for s in slots.values():
            if any(m for *_, m, _ in s.entries):
                s.stash = s.param.detach().clone()
            s.rebuild_weights()
        return list(slots.values())

    @staticmethod
    def _attention_mask_position(model: nn.Module) -> int | None:
        """Positional index of ``attention_mask`` in the top-level forward, if it has one."""
        try:
            names = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            return None
        return names.index("attention_mask") if "attention_mask" in names else None

    def _register_forward_hooks(self) -> None:
        for s in self.slots:
            if s.stash is not None:  # masked rows get no gradient (a no-op while the mask is full)
                self._handles.append(s.param.register_hook(lambda g, s=s: None if s.full else g * s.keep_weight))
        self._set_collect(True)

    def keep_hooks(self) -> None:
        """Keep the statistics hooks installed between refreshes (``compile_ready``): under torch.compile hooks
        that come and go are guards, and each state would compile its own graphs. Refresh steps still decide,
        at run time, which forwards collect."""
        self._hooks_stay = True
        self._set_collect(self._collect)

    def _set_collect(self, flag: bool) -> None:
        """Statistics hooks exist only while the next forward is a statistics forward (no cost otherwise),
        or always after ``keep_hooks()``."""
        self._collect = flag
        if (flag or self._hooks_stay) and not self._stat_handles:
            h = [self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)]
            for u in self.units:
                h.append(u.gate.register_forward_hook(lambda m, a, o, u=u: self._on_gate(u, o)))
                if u.up is not None:
                    h.append(u.up.register_forward_hook(lambda m, a, o, u=u: self._on_up(u, o)))
            self._stat_handles = h
        elif not (flag or self._hooks_stay):
            for h in self._stat_handles:
                h.remove()
            self._stat_handles = []

    # ---------------------------------------------------------------- statistics
    def _collecting(self) -> bool:
        return self._collect and torch.is_grad_enabled()

    @staticmethod
    def _tap(x: torch.Tensor | None, key: torch.Tensor, role: int) -> None:
        """A hook traced by dynamo: the statistics go to ``nalora::tap``, run eagerly on refresh steps (grad
        mode is a guard of every graph; the refresh flag is read at run time, so it is none)."""
        if torch.is_grad_enabled():
            _TAP(None if x is None else x.detach(), key, role)

    def _tapped(self, index: int, role: int, x: torch.Tensor | None) -> None:
        """``nalora::tap`` at run time (inside a compiled forward, where grad mode is off by construction)."""
        if not self._collect:
            return
        if role == _TAP_MASK:
            self._set_attention_mask(x)
        elif role == _TAP_GATE:
            self._gate_stats(self.units[index], x)
        else:
            self._up_stats(self.units[index], x)

    def _capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        compiling = torch.compiler.is_compiling()
        if not compiling and not self._collecting():
            return
        am = kwargs.get("attention_mask")
        if am is None and self._attn_pos is not None and len(args) > self._attn_pos:
            am = args[self._attn_pos]
        am = am if torch.is_tensor(am) and am.dim() == 2 else None
        if compiling:  # the whole model compiled: this hook is in the graph
            self._tap(am, self._tap_key, _TAP_MASK)
        else:
            self._set_attention_mask(am)

    def _set_attention_mask(self, am: torch.Tensor | None) -> None:
        self._attn = None if am is None else am.detach()
        # one cast and one sum per forward, shared by every FFN (it was one of each per FFN)
        self._attn_w = None if self._attn is None else self._attn.reshape(-1).to(torch.float32)
        self._attn_n = None if self._attn_w is None else self._attn_w.sum()

    @staticmethod
    def _part(out: torch.Tensor, rows: slice | None, dim: int) -> torch.Tensor:
        if rows is not None:
            out = out.narrow(dim, rows.start or 0, len(range(out.shape[dim])[rows]))
        return out if dim in (-1, out.dim() - 1) else out.movedim(dim, -1)

    def _on_gate(self, u: _Unit, out: torch.Tensor) -> None:
        if torch.compiler.is_compiling():
            self._tap(out, u.tap_key, _TAP_GATE)
        elif self._collecting():
            self._gate_stats(u, out)

    def _gate_stats(self, u: _Unit, out: torch.Tensor) -> None:
        out = out.detach()
        g = self._part(out, u.gate_rows, u.chunk_dim)
        if self.config.importance == "derivative":
            self._accumulate(u, g, None)
        elif u.layout == "packed":
            self._accumulate(u, g, self._part(out, u.up_rows, u.chunk_dim))
        elif "u" in u.pending:
            self._accumulate(u, g, u.pending.pop("u"))
        else:
            u.pending["g"] = g

    def _on_up(self, u: _Unit, out: torch.Tensor) -> None:
        if torch.compiler.is_compiling():
            self._tap(out, u.tap_key, _TAP_UP)
        elif self._collecting():
            self._up_stats(u, out)

    def _up_stats(self, u: _Unit, out: torch.Tensor) -> None:
        v = self._part(out.detach(), None, u.chunk_dim)
        if "g" in u.pending:
            self._accumulate(u, u.pending.pop("g"), v)
        else:
            u.pending["u"] = v

    def _accumulate(self, u: _Unit, g: torch.Tensor, v: torch.Tensor | None) -> None:
        """Add one forward's per-channel sums (device tensors only, no host sync). Always eager: from a hook, or
        from ``nalora::tap`` at run time under torch.compile."""
        u.acc["calls"] = u.acc.get("calls", 0) + 1
        # the training forward may run under autocast: keep the statistics in float32
        with torch.autocast(device_type=g.device.type, enabled=False):
            self._accumulate_f32(u, g, v)

    def _accumulate_f32(self, u: _Unit, g: torch.Tensor, v: torch.Tensor | None) -> None:
        lead = tuple(g.shape[:-1])
        g2 = g.reshape(-1, u.d_ff).float()
        if v is None:
            resp = dphi(u.act, g2).abs()
        else:
            resp = _jacobian(u.act, g2, v.reshape(-1, u.d_ff).float()).abs_()
        am = self._attn
        use_mask = am is not None and tuple(am.shape) == lead
        w = self._attn_w if use_mask else None
        n: Any = self._attn_n if use_mask else g2.shape[0]
        sums = {"r": resp}
        if u.thresholds is not None:
            z_min, z_lin = u.thresholds
            sums["supp"] = (g2 < z_min).to(g2.dtype)
            sums["lin"] = (g2 >= z_lin).to(g2.dtype)
        acc = u.acc
        for key, x in sums.items():
            s = x.sum(0) if w is None else w @ x
            acc[key] = s if key not in acc else acc[key] + s
        acc["n"] = n if "n" not in acc else acc["n"] + n

    @torch.no_grad()
    def _all_reduce_statistics(self) -> None:
        """Data parallel (``torch.distributed`` initialised, several ranks): sum this step's statistics over
        ranks, so that every rank computes the same EMA, mask and step scales and the replicas stay equal.
        Refresh steps only; one collective per controlled FFN."""
        import torch.distributed as dist

        for u in self.units:
            dev = u.keep.device
            zeros = torch.zeros(u.d_ff, device=dev)
            keys = ["r", "supp", "lin"] if u.thresholds is not None else ["r"]
            n = u.acc.get("n", 0.0)
            flat = torch.cat([*(u.acc.get(k, zeros).float() for k in keys),
                              torch.as_tensor(n, dtype=torch.float32, device=dev).reshape(1)])
            dist.all_reduce(flat)
            if float(flat[-1]) > 0:  # some rank saw this FFN (a host sync, on refresh steps only)
                parts = flat[:-1].split(u.d_ff)
                u.acc = {**dict(zip(keys, parts)), "n": flat[-1]}
            else:
                u.acc = {}

    @torch.no_grad()
    def _update_statistics(self) -> list[torch.Tensor | None]:
        """EMA update from this step's sums; returns this step's channel-mean regime occupancy per unit."""
        self.stat_calls += sum(u.acc.pop("calls", 0) for u in self.units)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            self._all_reduce_statistics()
        beta = self.config.beta
        batch_occ: list[torch.Tensor | None] = []
        for u in self.units:
            acc, u.acc = u.acc, {}
            u.pending.clear()
            if "n" not in acc:  # no statistics forward reached this FFN: keep the old state
                batch_occ.append(None)
                continue
            n = acc["n"].clamp_min(1e-12) if torch.is_tensor(acc["n"]) else max(float(acc["n"]), 1e-12)
            r = acc["r"].float() / n
            # first observation initialises the EMAs (a zero start would shrink gamma by (1 - beta))
            u.importance = r if u.importance is None else u.importance.mul_(beta).add_(r, alpha=1 - beta)
            occ = None
            if u.thresholds is not None:
                supp, lin = acc["supp"].float() / n, acc["lin"].float() / n
                occ = torch.stack([supp, 1.0 - supp - lin, lin], dim=-1)
                u.occupancy = occ if u.occupancy is None else u.occupancy.mul_(beta).add_(occ, alpha=1 - beta)
                if u.gammas is not None:
                    u.gamma = u.occupancy @ u.gammas
            batch_occ.append(None if occ is None else occ.mean(0))
        for s in self.slots:
            if s.scaled:
                self._sync_slot(s)
        return batch_occ

    @staticmethod
    def _sync_slot(s: Slot) -> None:
        """A slot's keep mask and step scales from its units' (after new statistics, a refresh or a restore)."""
        keep = torch.ones_like(s.keep)
        for u, idx, masked, scaled in s.entries:
            if masked:
                keep.index_copy_(0, idx, u.keep)
            if scaled and u.gamma is not None:
                s.scale.index_copy_(0, idx, u.gamma)
        s.keep = keep
        s.full = all(u.k == u.d_ff for u, _, masked, _ in s.entries if masked)
        s.rebuild_weights()

    @torch.no_grad()
    def _refresh_mask(self) -> tuple[float, list[torch.Tensor | None]]:
        """New keep sets (``mask_selection``); stash newly masked rows, restore returning ones."""
        if not self.config.mask:
            return 1.0, [None] * len(self.units)
        if self.total_steps is None:
            raise ValueError("NA-LoRA mask needs total_steps (optimiser steps of the run)")
        c = self.config
        rho = keep_fraction(self.step + 1, self.total_steps, c.warmup_frac, c.final_frac, c.rho_final)
        turnover: list[torch.Tensor | None] = []
        for u in self.units:
            if u.importance is None:
                turnover.append(None)
                continue
            k = keep_count(rho, u.d_ff)
            new = torch.zeros_like(u.keep).scatter_(0, self._select(u, k), True)
            turnover.append((new & ~u.keep).sum() / k)
            u.keep, u.k = new, k
        new_full = {id(u): u.k == u.d_ff for u in self.units}
        # slots whose mask stays full (warm-up) need nothing; the rest move with a few foreach kernels
        moved = [s for s in self.slots if s.stash is not None
                 and not (s.full and all(new_full[id(u)] for u, _, m, _ in s.entries if m))]
        if moved:
            old_weights = [s.keep_weight for s in moved]
            for s in moved:
                self._sync_slot(s)
            stashes, params = [s.stash for s in moved], [s.param for s in moved]  # no_grad: no detach views
            torch._foreach_lerp_(stashes, params, old_weights)  # stash := logical B (kept rows from B)
            torch._foreach_copy_(params, torch._foreach_mul(stashes, [s.keep_weight for s in moved]))
        return rho, turnover

    def _select(self, u: _Unit, k: int) -> torch.Tensor:
        """Indices of the ``k`` channels of ``u`` kept until the next refresh."""
        how = self.config.mask_selection
        if how == "random":  # control: a fresh uniform draw at every refresh
            # non_blocking: the CPU draw goes to the device without waiting for the queued GPU work
            return torch.randperm(u.d_ff, generator=self._generator)[:k].to(u.keep.device, non_blocking=True)
        if how == "static":  # control: the ranking of the first refresh at/after t_w, never refreshed
            if u.ranking is None and warmup_over(self.step + 1, self.total_steps, self.config.warmup_frac):
                u.ranking = torch.argsort(u.importance, descending=True, stable=True)
            if u.ranking is not None:
                return u.ranking[:k]
        return torch.topk(u.importance, k).indices

    # ---------------------------------------------------------------- optimiser hooks
    def _before_attach(self, total_steps: int | None) -> None:
        if total_steps is not None:
            self.total_steps = self._check_steps(total_steps)
        if self.config.mask and self.total_steps is None:
            raise ValueError("NA-LoRA mask needs total_steps (optimiser steps of the run)")

    @torch.no_grad()
    def _post_step(self) -> None:
        collecting = self._collect
        # gamma of this step comes from the EMA, updated with this step's statistics first (NALORA.md)
        batch_occ = self._update_statistics() if collecting else None
        self._correct_step()
        if collecting:
            rho, turnover = self._refresh_mask()
            self._record(rho, turnover, batch_occ)
        self.step += 1
        self._set_collect(self.step % self.config.mask_interval == 0)
        self._attn = self._attn_w = self._attn_n = None

    # ---------------------------------------------------------------- diagnostics
    def _record(self, rho: float, turnover: list, batch_occ: list) -> None:
        dev = self.units[0].keep.device
        # made on the device: a CPU tensor moved there is a blocking host-to-device copy (nalora_mask has no gamma)
        nan = torch.full((), float("nan"), device=dev)
        nan3 = torch.full((3,), float("nan"), device=dev)

        def stack(xs: list, fill: torch.Tensor) -> torch.Tensor:
            return torch.stack([fill.to(dev) if x is None else x.float().to(dev) for x in xs])

        self._history.append({
            "step": self.step,
            "rho": rho,
            "kept_fraction": [u.k / u.d_ff for u in self.units],
            "turnover": stack(turnover, nan),
            "occupancy": stack(batch_occ, nan3),
            "gamma_mean": stack([None if u.gamma is None else u.gamma.mean() for u in self.units], nan),
        })

    def history(self) -> dict[str, Any]:
        """Mask dynamics per statistics refresh (syncs with the host: call it for logging, not per step).
        Tensor statistics come as the shortest decimals of their float32 values (exact at float32).

        ``occupancy[i][j]`` is the (supp, sel, lin) fraction of layer j's tokens x channels on refresh i;
        ``turnover`` the fraction of the new keep set not kept before; NaN where not applicable.
        """
        out: dict[str, Any] = {"layers": [u.name for u in self.units], "step": [], "rho": [],
                               "kept_fraction": [], "turnover": [], "occupancy": [], "gamma_mean": []}
        for h in self._history:
            for key in ("step", "rho", "kept_fraction"):
                out[key].append(h[key])
            for key in ("turnover", "occupancy", "gamma_mean"):
                out[key].append(_float32_list(h[key]))
        return out

    # ---------------------------------------------------------------- persistence and teardown
    def state_dict(self) -> dict[str, Any]:
        """Controller state for resuming (the adapter weights themselves live in the peft model)."""
        return {
            "step": self.step,
            "collect": self._collect,
            "total_steps": self.total_steps,
            "units": [{"importance": u.importance, "occupancy": u.occupancy, "keep": u.keep.clone(), "k": u.k,
                       "ranking": u.ranking} for u in self.units],
            "generator": self._generator.get_state(),
            "stash": [None if s.stash is None else s.stash.clone() for s in self.slots],
            "history": list(self._history),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output onto a controller built on the same model and FFNs."""
        if len(state["units"]) != len(self.units) or len(state["stash"]) != len(self.slots):
            raise ValueError("controller state does not match this controller's FFNs")
        self.step = int(state["step"])
        self._set_collect(bool(state["collect"]))
        self.total_steps = state["total_steps"]
        for u, st in zip(self.units, state["units"]):
            dev = u.keep.device
            u.importance = None if st["importance"] is None else st["importance"].to(dev).clone()
            u.occupancy = None if st["occupancy"] is None else st["occupancy"].to(dev).clone()
            u.keep, u.k = st["keep"].to(dev).clone(), int(st["k"])
            ranking = st.get("ranking")
            u.ranking = None if ranking is None else ranking.to(dev).clone()
            u.gamma = None if (u.occupancy is None or u.gammas is None) else u.occupancy @ u.gammas
        for s, stash in zip(self.slots, state["stash"]):
            if stash is not None and s.stash is not None:
                s.stash.copy_(stash)
            self._sync_slot(s)
        if "generator" in state:
            self._generator.set_state(state["generator"])
        self._history = list(state.get("history", []))

    def remove(self) -> None:
        """Remove every hook. The parameters already hold ``diag(m) B`` (the mask is applied in place)."""
        self._hooks_stay = False
        self._set_collect(False)
        super().remove()

    def fold(self) -> None:
        """End of training: ``B <- diag(m) B`` (and the ablation variants), hooks removed, stash dropped.

        The mask lives in the parameters already, so this makes it final; what remains is a plain peft
        LoRA adapter.
        """
        with torch.no_grad():
            for s in self.slots:
                if s.stash is not None:
                    s.param.mul_(s.view(s.keep).to(s.param.dtype))
                    s.stash = None
        super().fold()


def _float32_list(t: torch.Tensor) -> list:
    """``t.tolist()`` with each value the shortest decimal that is the same float32 (0.87179524, not
    0.8717952370643616): the statistics are float32, and a run record then stores half the digits."""
    import numpy as np

    a = t.detach().float().cpu().numpy()
    return np.array([float(str(v)) for v in a.ravel()]).reshape(a.shape).tolist()  # v: a numpy float32
