"""Learned rotations (rotate: r1 / r2: learned): R1 and every layer's R2 optimized on calibration text
for next-token loss through the program as the quantize pass will round it (SpinQuant's idea).

One definition of where rotations go. The pass's own placement (`rotate.place`: the R1, R2,
R3, R4 rule tables) runs once on a float32 copy of the program with *live* rotations — objects used as `X @ R`,
`R.T @ X`, whose matrix is set per training step — and a recording `_Weights`: per constant, the ordered
edit functions it would apply. A step then

    R  = R0 · (I − A)⁻¹(I + A),  A = P − Pᵀ   (Cayley: orthogonal for every P; R0 the randomized
                                               Hadamard the fixed rotation uses, so step 0 is it)
    W' = edits(W) with the current R's       (differentiable)
    Ŵ  = fake_quantize(W')                    (RTN's min/max rule, straight-through rounding:
                                               kernels.quant_rtn; the linears quantize will quantize:
                                               all but the lm_head — patterns.residual.output_linear —
                                               and MoE routers)
    loss = mean next-token cross-entropy of the copy run on [1, T] calibration windows with Ŵ

and Adam moves every P (learning rate `lr`, decaying linearly to 0 over the steps). Fixed parts (R3,
R4, a fixed R1 or R2) are applied to the copy directly. Where two edits meet one weight they multiply
opposite sides (v_proj: R1 its columns, R2 its rows; o_proj: R1 its rows, R2 its columns; down_proj:
R1 its rows, R4 its columns), so they commute and recording some while applying others keeps the result.

The learned matrices are made exactly orthogonal in float64 (the polar factor of R0·Cayley(A)) and the
pass folds them in by the same rules as fixed ones: the float64 certificate holds as before (≤ 1e-10).
Not learned here: activation / KV fake quantization (a recipe quantizing them trains on the weights only).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from spinfx.engine.errors import BadInput, Unsupported
from spinfx.engine.graph import Program
from spinfx.kernels.quant_rtn import fake_quantize, group_for
from spinfx.passes.rotate import LEARN_WEIGHTS, LEARNED, _Weights, fixed_r2, make_rotation, place
from spinfx.patterns.common import is_linear, linear_weight
from spinfx.patterns.moe import routers
from spinfx.patterns.residual import output_linear, residual_stream
from spinfx.passes.calibration import check_calibration, token_batches
from spinfx.engine.pipeline import Context, PassResult

aten = torch.ops.aten


class _Live:
    """A rotation whose matrix (`value`) is set per training step: R0·Cayley(P − Pᵀ), P trained."""

    def __init__(self, r0: torch.Tensor, dtype: torch.dtype):
        self.r0 = r0.to(torch.float64)
        self.shape = tuple(r0.shape)
        self.p = torch.zeros(self.shape, dtype=dtype, requires_grad=True)
        self.value: torch.Tensor | None = None

    def matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        p = self.p if dtype is None else self.p.detach().to(dtype)
        a = p - p.T
        eye = torch.eye(self.shape[0], dtype=a.dtype)
        return self.r0.to(a.dtype) @ torch.linalg.solve(eye - a, eye + a)

    def final(self) -> torch.Tensor:
        """The learned R in float64, exactly orthogonal (the polar factor U·Vᵀ of R0·Cayley)."""
        u, _, vh = torch.linalg.svd(self.matrix(torch.float64))
        return u @ vh

    def __rmatmul__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.value

    @property
    def T(self) -> "_LiveT":
        return _LiveT(self)

    def dense(self) -> torch.Tensor:  # only an online R1 (a tied embedding kept whole) asks for the matrix
        raise Unsupported("rotate: r1: learned with a tied embedding kept whole (fold-norms tie: keep / auto "
                          "applies R1 online) is not supported: untie it (fold-norms tie: untie) or use r1: hadamard")


class _LiveT:
    def __init__(self, r: _Live):
        self.r = r

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.r.value.T @ x


# Only large GEMM-like ops (matmuls, attention, the Cayley solve: ≥ 4M multiply-adds) run on more than
# one thread; every other op of a training step runs on one. On a loaded machine each parallel region
# waits for a descheduled thread: the tiny-llama test took 60 s with 2 threads at load ≈ 3.5, 3.6 s with
# one (GPTQ's calibration forward found the same: bench/README.md).
_GEMMS = {"mm", "bmm", "addmm", "baddbmm", "_linalg_solve_ex", "linalg_lu_factor_ex", "linalg_lu_solve",
          "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"}
_THREADED_MACS = 1 << 22


class _GemmThreads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.threads = torch.get_num_threads()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        n = 1
        if self.threads > 1 and func.overloadpacket.__name__ in _GEMMS:
            ts = [a for a in args if isinstance(a, torch.Tensor)]
            ts = ts[1:] if func.overloadpacket.__name__ in ("addmm", "baddbmm") else ts  # the bias first
            macs = ts[0].numel() * (ts[1] if len(ts) > 1 else ts[0]).shape[-1]
            n = self.threads if macs >= _THREADED_MACS else 1
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)
        return super().__exit__(*exc)


class _Recorder(_Weights):
    """Records each constant's edit functions, in order, instead of applying them."""

    def __init__(self, prog: Program, edits: dict[str, list]):
        super().__init__(prog)
        self.edits = edits

    def apply(self, fqn: str, fn) -> None:
        self.edits.setdefault(fqn, []).append(fn)


@dataclass
class Learned:
    r1: torch.Tensor | None        # float64 [hidden, hidden]
    r2: list[torch.Tensor] | None  # float64 [head_dim, head_dim] per attention site


def learn(opts, prog: Program, ctx: Context, res: PassResult) -> Learned:
    """Train the learned rotations of `opts` (a Rotate pass) on `ctx.calib`; record what happened in `res`."""
    from spinfx.engine.certify import model_dtype

    t0 = time.perf_counter()
    batches, ids = _windows(opts, prog, ctx)
    dtype = torch.float64 if model_dtype(prog) is torch.float64 else torch.float32
    work = prog.clone()
    for fqn, t in work.consts().items():
        if t.is_floating_point() and t.dtype != dtype:
            work.set_const(fqn, t.to(dtype))

    # the pass's own placement on the copy, learned rotations live and their edits recorded
    edits: dict[str, list] = {}
    lives: list[_Live] = []
    R1 = None
    if opts.r1 != "none":
        hidden = residual_stream(work.graph).embedding.meta["val"].shape[-1]
        R1 = make_rotation("hadamard" if opts.r1 == LEARNED else opts.r1, hidden, opts.seed)
        if opts.r1 == LEARNED:
            R1 = _Live(R1.dense(), dtype)
            lives.append(R1)
    r2 = None if opts.r2 == "none" else fixed_r2("hadamard" if opts.r2 == LEARNED else opts.r2, opts.seed, ctx.site_base)
    r2_lives: list[_Live] = []
    if opts.r2 == LEARNED:
        start = r2

        def r2(i, hd):
            r2_lives.append(_Live(start(i, hd).dense(), dtype))
            return r2_lives[-1]
    place(work, PassResult("rotate", {}), R1, r2, opts.r3, opts.r4, opts.r4_block,
          w1=_Recorder(work, edits) if opts.r1 == LEARNED else None,
          w2=_Recorder(work, edits) if opts.r2 == LEARNED else None)
    lives += r2_lives
    work.gm.recompile()  # R3 / R4 inserted online transforms: the module's code must run them

    # what the quantize pass will round: every linear but the lm_head and MoE routers
    head = output_linear(work.graph)
    if head is None:
        raise Unsupported("rotate: learned rotations train on next-token loss, and no lm_head (one linear whose "
                          "result is the logits output) was found")
    skip = routers(work.graph) | {head}
    quant = {linear_weight(n).target: n.target is aten.addmm.default
             for n in work.graph.nodes if is_linear(n) and n not in skip}
    w = {**LEARN_WEIGHTS, **opts.weights}

    def fq(fqn: str, t: torch.Tensor) -> torch.Tensor:
        m = t.T if quant[fqn] else t  # [out, in]
        m = fake_quantize(m, w["bits"], group_for(m.shape[1], w["group_size"]), w["symmetric"])
        return m.T if quant[fqn] else m

    with torch.no_grad():
        fixed = {f: fq(f, work.const(f)) for f in quant if f not in edits}
    vocab = head.meta["val"].shape[-1]

    def weights() -> dict[str, torch.Tensor]:
        out = {}
        for fqn, fns in edits.items():
            t = work.const(fqn)
            for fn in fns:
                t = fn(t)
            out[fqn] = fq(fqn, t) if fqn in quant else t
        return out

    def loss_of(consts: dict, b: list, y: torch.Tensor) -> torch.Tensor:
        outs = pytree.tree_leaves(torch.func.functional_call(work.gm, consts, tuple(b)))
        logits = next((o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()
                       and tuple(o.shape) == (*y.shape, vocab)), None)
        if logits is None:
            raise Unsupported(f"rotate: learned rotations need the logits [{', '.join(map(str, y.shape))}, {vocab}] "
                              f"among the program's outputs")
        return torch.nn.functional.cross_entropy(logits[..., :-1, :].reshape(-1, vocab).float(), y[..., 1:].reshape(-1))

    opt = torch.optim.Adam([r.p for r in lives], lr=opts.lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / opts.steps)  # linearly to 0
    curve: list[float] = []
    last_note = t0
    with torch.enable_grad(), _GemmThreads():
        for step in range(opts.steps):
            for r in lives:
                r.value = r.matrix()
            ws = weights()
            leaves = {k: v.detach().requires_grad_() for k, v in ws.items()}
            total = 0.0
            for b, y in zip(batches, ids):
                loss = loss_of({**fixed, **leaves}, b, y) / len(batches)
                loss.backward()
                total += loss.item()
            grads = [(ws[k], v.grad) for k, v in leaves.items() if v.grad is not None]
            torch.autograd.backward([g[0] for g in grads], [g[1] for g in grads])
            opt.step()
            opt.zero_grad()
            decay.step()
            curve.append(total)
            if ctx.progress is not None and (time.perf_counter() - last_note > 10 or step + 1 == opts.steps):
                last_note = time.perf_counter()
                ctx.progress(f"rotate: learning step {step + 1}/{opts.steps}, loss {total:.4f} "
                             f"(step 1: {curve[0]:.4f}), {last_note - t0:.0f} s")

    finals = [r.final() for r in lives]
    with torch.no_grad(), _GemmThreads():  # the loss with the exactly orthogonal matrices the pass folds in
        for r, f in zip(lives, finals):
            r.value = f.to(dtype)
        consts = {**fixed, **weights()}
        end = sum(loss_of(consts, b, y).item() for b, y in zip(batches, ids)) / len(batches)
    seconds = time.perf_counter() - t0
    tokens = sum(y.numel() for y in ids)
    every = max(1, opts.steps // 10)
    res.findings["learned"] = {
        "r1": opts.r1 == LEARNED, "r2": opts.r2 == LEARNED, "steps": opts.steps, "lr": opts.lr,
        "windows": len(batches), "tokens": tokens, "seconds": round(seconds, 2),
        "weights": {**w, "method": "rtn (straight-through)", "linears": len(quant)},
        "loss": {"start": round(curve[0], 6), "end": round(end, 6),
                 "curve": [[s + 1, round(curve[s], 6)] for s in range(0, opts.steps, every)]}}
    res.notes.append(f"learned {' and '.join(k.upper() for k in ('r1', 'r2') if getattr(opts, k) == LEARNED)} "
                     f"(Cayley, Adam lr {opts.lr} decaying to 0, {opts.steps} steps) on {len(batches)} calibration "
                     f"windows ({tokens} tokens) through {w['bits']}-bit RTN weights: loss {curve[0]:.4f} → {end:.4f}, "
                     f"{seconds:.0f} s")
    return Learned(r1=finals[0] if opts.r1 == LEARNED else None,
                   r2=finals[len(finals) - len(r2_lives):] if opts.r2 == LEARNED else None)


def _windows(opts, prog: Program, ctx: Context) -> tuple[list[list], list[torch.Tensor]]:
    """The calibration windows (graph inputs) and each one's token ids."""
    if not isinstance(ctx.calib, torch.Tensor) or ctx.calib.is_floating_point():
        raise BadInput("rotate: learned rotations need calibration text: pass calib=<1-D tensor of token ids> "
                       "(e.g. spinfx.rewrite(model, recipe, calib=tokens); CLI: --calib FILE)")
    pos = next((i for i, e in enumerate(prog.examples) if isinstance(e, torch.Tensor) and not e.is_floating_point()), None)
    if pos is None:
        raise Unsupported("rotate: learned rotations need a program whose input is token ids")
    check_calibration(ctx.calib.numel(), opts.windows, prog.examples[pos].numel(), who=opts.calibration_words)
    batches = token_batches(prog, ctx.calib.reshape(-1), limit=opts.windows)
    return batches, [b[pos] for b in batches]
