"""Quality table: SmolLM2-135M perplexity under quantization, with and without SpinQuant rotations.

    .venv/bin/python bench/bench_quality.py                       # the table in bench/README.md
    .venv/bin/python bench/bench_quality.py --only w4-rtn,w4-spin-gptq --windows 8
    .venv/bin/python bench/bench_quality.py --weights-only        # the weight-grid analysis alone

Evaluation: Hamlet, ctx 512, the first `--windows` non-overlapping windows. GPTQ calibration: 128
windows of 512 tokens from other plays (`spinfx.tools.evaluate.calibration_tokens`: texts in name order,
Hamlet excluded), so calibration and evaluation never overlap. Weights: symmetric, group 64 (128 does
not divide SmolLM2's 576), RTN or GPTQ; lm_head kept in float. Activations: per-token symmetric
fake-quant; KV: per-head asymmetric fake-quant. The rewrites run with certify=False for fold/rotate
(their certificates are tested elsewhere); the quantize pass always certifies itself.

`--weights-only` measures what the rotations do to the weights themselves: SmolLM2's weights are
de-quantized Q4_1 (asymmetric, group 32), so each group of 32 holds at most 16 values on a grid.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from spinfx.api import rewrite
from spinfx.tools.evaluate import calibration_tokens, evaluate
from spinfx.checkpoint.hf import load_model
from spinfx.api import calibration_windows
from spinfx.passes import FoldNorms, Quantize, Rotate
from spinfx.recipe import PRESETS, Recipe, load_recipe

CTX = 512


def _w(bits: int, method: str = "rtn", clip: str = "minmax", act_order: bool = False) -> dict:
    w = {"bits": bits, "group_size": 64, "symmetric": True, "method": method, "clip": clip}
    return {**w, "act_order": True} if act_order else w


def _passes(rotation: str | None, bits: int, method: str = "rtn", acts: int | None = None, kv: int | None = None,
            clip: str = "minmax", act_order: bool = False):
    pre = load_recipe(rotation).passes if rotation else []
    q = Quantize(weights=_w(bits, method, clip, act_order), activations={"bits": acts} if acts else None,
                 kv_cache={"bits": kv} if kv else None)
    return pre + [q]


def _learned(bits: int, steps: int = 12, lr: float = 0.002, windows: int = 4) -> list:
    """fold + learned R1/R2 (trained through RTN W`bits` g64 on `windows` calibration windows) + R3/R4 Hadamard."""
    return [FoldNorms(), Rotate(r1="learned", r2="learned", r3=True, r4=True, steps=steps, lr=lr, windows=windows,
                                weights={"bits": bits, "group_size": 64})]


# name -> (label, passes or None for the float model)
CONFIGS = {
    "fp32": ("fp32", None),
    "w4-rtn": ("W4A16 RTN", _passes(None, 4)),
    "w4-fold-rtn": ("W4A16 fold + RTN (diagnostic)", _passes("fold", 4)),
    "w4-r1r2-rtn": ("W4A16 R1+R2 + RTN (diagnostic)", _passes("rotate", 4)),
    "w4-spin-rtn": ("W4A16 spinquant + RTN", _passes("spinquant", 4)),
    "w4-spin-gptq": ("W4A16 spinquant + GPTQ", _passes("spinquant", 4, "gptq")),
    "w4-gptq": ("W4A16 GPTQ (diagnostic)", _passes(None, 4, "gptq")),
    "w3-rtn": ("W3A16 RTN", _passes(None, 3)),
    "w3-gptq": ("W3A16 GPTQ (diagnostic)", _passes(None, 3, "gptq")),
    "w3-spin-rtn": ("W3A16 spinquant + RTN", _passes("spinquant", 3)),
    "w3-spin-gptq": ("W3A16 spinquant + GPTQ", _passes("spinquant", 3, "gptq")),
    "w4a8-rtn": ("W4A8 RTN", _passes(None, 4, acts=8)),
    "w4a8-spin-rtn": ("W4A8 spinquant + RTN", _passes("spinquant", 4, acts=8)),
    "w4a4kv4-rtn": ("W4A4KV4 RTN", _passes(None, 4, acts=4, kv=4)),
    "w4a8-spin-gptq": ("W4A8 spinquant + GPTQ", _passes("spinquant", 4, "gptq", acts=8)),
    "w4a4kv4-spin-rtn": ("W4A4KV4 spinquant + RTN", _passes("spinquant", 4, acts=4, kv=4)),
    "w4a4kv4-spin-gptq": ("W4A4KV4 spinquant + GPTQ", _passes("spinquant", 4, "gptq", acts=4, kv=4)),
    # clip: mse — each group's range shrunk to its least squared error (kernels/quant_rtn.py)
    "w4-rtn-mse": ("W4A16 RTN, MSE clip", _passes(None, 4, clip="mse")),
    "w4-spin-rtn-mse": ("W4A16 spinquant + RTN, MSE clip", _passes("spinquant", 4, clip="mse")),
    "w3-rtn-mse": ("W3A16 RTN, MSE clip", _passes(None, 3, clip="mse")),
    "w3-spin-rtn-mse": ("W3A16 spinquant + RTN, MSE clip", _passes("spinquant", 3, clip="mse")),
    "w4-spin-gptq-mse": ("W4A16 spinquant + GPTQ, MSE clip", _passes("spinquant", 4, "gptq", clip="mse")),
    # act-order: columns by decreasing Hessian diagonal, groups in that order (g_idx)
    "w4-spin-gptq-act": ("W4A16 spinquant + GPTQ, act-order", _passes("spinquant", 4, "gptq", act_order=True)),
    "w4-spin-gptq-mse-act": ("W4A16 spinquant + GPTQ, MSE clip, act-order",
                             _passes("spinquant", 4, "gptq", clip="mse", act_order=True)),
    "w4a4kv4-spin-rtn-mse": ("W4A4KV4 spinquant + RTN, MSE clip", _passes("spinquant", 4, acts=4, kv=4, clip="mse")),
    # learned R1/R2 (passes/rotate_learn.py): 12 Adam steps on 4 calibration windows of 512 tokens
    "w4-spinL-rtn": ("W4A16 spinquant, learned R1/R2 + RTN", _learned(4) + _passes(None, 4)),
    "w3-spinL-rtn": ("W3A16 spinquant, learned R1/R2 + RTN", _learned(3) + _passes(None, 3)),
    "w4-spinL24-rtn": ("W4A16 spinquant, learned R1/R2 (24 steps, lr 0.003) + RTN",
                       _learned(4, steps=24, lr=0.003) + _passes(None, 4)),
}
# the presets as they are (their own group sizes, 8-bit embedding/lm_head, calibration windows): what users get
PRESET = "preset:"
CONFIGS.update({PRESET + n: (f"preset {n}", None) for n in PRESETS if "quantize" in json.dumps(PRESETS[n])})


def run_config(name: str, windows: int, calib: torch.Tensor) -> dict:
    # preset:NAME (a preset as it is) or yaml:PATH (a YAML recipe as it is: its own samples)
    preset = name.split(":", 1)[1] if name.startswith((PRESET, "yaml:")) else None
    label, passes = CONFIGS[name] if name in CONFIGS else (f"recipe {preset}", None)
    if preset:
        passes = load_recipe(preset).passes
    model, tok = load_model("smollm2")
    row = {"config": name, "label": label}
    t0 = time.perf_counter()
    if passes is not None:
        gptq = any(isinstance(p, Quantize) and p.weights["method"] == "gptq" for p in passes)
        example = {"input_ids": torch.zeros(1, CTX, dtype=torch.long), "use_cache": False}
        if gptq and not preset:  # calibrate on every window given (a recipe refuses fewer windows than its `samples`)
            passes = [dataclasses.replace(p, samples=calib.numel() // CTX) if isinstance(p, Quantize) else p
                      for p in passes]
        calibrates = gptq or calibration_windows(Recipe(name, passes)) > 0
        r = rewrite(model, Recipe(name, passes), example, calib=calib if calibrates else None, certify=False)
        q = r.report.pass_result("quantize")
        row.update(rewrite_s=round(time.perf_counter() - t0, 1), quantize_s=round(q.seconds, 1),
                   quantizing_s=q.findings["seconds_quantizing"], certificate=q.certificate["rel"],
                   **{k: q.findings["quantized"][k] for k in ("bits_per_weight", "error_mean", "error_max")})
        rot = r.report.pass_result("rotate")
        learned = rot.findings.get("learned") if rot is not None else None
        if learned:  # steps, lr, windows, tokens, seconds, the loss curve
            row["learned"] = learned
        if gptq:  # per weight family: output error on the calibration inputs, GPTQ and what RTN would give
            # (the 8-bit embedding / lm_head of a preset are RTN: no GPTQ output errors)
            gptq_layers = {m: r for m, r in q.findings["layers"].items() if "output_error" in r}
            row["output_error"] = _by_family(gptq_layers, ("output_error", "rtn_output_error"))
            row["layers"] = {m: {k: r[k] for k in ("error", "output_error", "rtn_output_error")}
                             for m, r in gptq_layers.items()}
            row["gptq_note"] = next((n for n in q.notes if n.startswith("GPTQ:")), None)
        model = r.module
    res = evaluate(model, "hamlet", CTX, windows, tokenizer=tok, label=name)
    row.update(ppl=round(res.ppl, 3), eval_s=round(res.seconds, 1))
    return row


FAMILIES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _by_family(layers: dict, keys: tuple) -> dict:
    """Mean of `keys` over the layers of each weight family (q_proj, …, down_proj)."""
    out = {}
    for fam in FAMILIES:
        rows = [r for m, r in layers.items() if m.endswith(fam)]
        out[fam] = {k: round(sum(r[k] for r in rows) / len(rows), 5) for k in keys}
    return out


# ---- what rotations do to SmolLM2's weights --------------------------------------------------------


def _kurtosis(w: torch.Tensor) -> float:
    x = w.double().flatten()
    x = x - x.mean()
    return ((x ** 4).mean() / (x ** 2).mean() ** 2).item()


def _on_q4_1_grid(w: torch.Tensor) -> float:
    """Fraction of the groups of 32 consecutive weights that hold at most 16 distinct values, all on
    one grid min + k·d (what de-quantized Q4_1 looks like)."""
    g = w.double().reshape(-1, 32)
    lo, hi = g.min(1, keepdim=True).values, g.max(1, keepdim=True).values
    d = ((hi - lo) / 15).clamp_min(1e-30)
    k = (g - lo) / d
    return ((k - k.round()).abs() < 1e-3).all(1).double().mean().item()


def _rtn_error(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> float:
    from spinfx.kernels.quant_rtn import quantize_rtn
    from spinfx.kernels.quant_weight import dequantize

    w = w.double()
    return ((w - dequantize(quantize_rtn(w, bits, group, symmetric), torch.float64)).norm() / w.norm()).item()


def weight_analysis() -> dict:
    """Per weight family: kurtosis, share of groups on a Q4_1 grid, RTN errors (sym g64 4-bit, asym g32
    4-bit, sym g64 3-bit), for the original weights, after fold-norms, and after spinquant."""
    stages = {}
    for stage in ("original", "fold", "spinquant"):
        model, _ = load_model("smollm2")
        if stage == "original":
            ws = {n.removesuffix(".weight"): p.detach() for n, p in model.named_parameters()
                  if n.endswith("proj.weight")}
        else:
            prog = rewrite(model, stage, certify=False).program
            ws = {n.removesuffix(".weight"): t for n, t in prog.consts().items() if n.endswith("proj.weight")}
        rows = {}
        for fam in FAMILIES:
            mats = [w for n, w in ws.items() if n.endswith(fam)]
            rows[fam] = {
                "kurtosis": sum(_kurtosis(w) for w in mats) / len(mats),
                "q4_1_grid": sum(_on_q4_1_grid(w) for w in mats) / len(mats),
                "rtn_w4_sym_g64": sum(_rtn_error(w, 4, 64, True) for w in mats) / len(mats),
                "rtn_w4_asym_g32": sum(_rtn_error(w, 4, 32, False) for w in mats) / len(mats),
                "rtn_w3_sym_g64": sum(_rtn_error(w, 3, 64, True) for w in mats) / len(mats),
            }
        stages[stage] = rows
        print(f"[bench] weights: {stage} done", file=sys.stderr, flush=True)
    return stages


def layer_errors(calib: torch.Tensor, samples: int = 4, bits: int = 4) -> dict:
    """Per weight family, RTN's (and GPTQ's) output error ‖X(W − Ŵ)ᵀ‖/‖XWᵀ‖ on `samples` calibration
    windows, with no rewrite, after fold-norms, after R1+R2 and after spinquant: where rotation helps
    and where it hurts RTN. (The quantize pass computes both errors for GPTQ layers; Hessians from
    the already-quantized earlier layers' outputs.)"""
    out = {}
    for stage in (None, "fold", "rotate", "spinquant"):
        model, _ = load_model("smollm2")
        example = {"input_ids": torch.zeros(1, CTX, dtype=torch.long), "use_cache": False}
        pre = load_recipe(stage).passes if stage else []
        r = rewrite(model, Recipe(f"errors-{stage}", pre + [Quantize(weights=_w(bits, "gptq"), samples=samples)]),
                    example, calib=calib[:samples * CTX], certify=False)
        layers = r.report.pass_result("quantize").findings["layers"]
        fam = _by_family(layers, ("rtn_output_error", "output_error"))
        worst = sorted(layers.items(), key=lambda kv: -kv[1]["rtn_output_error"])[:5]
        out[stage or "none"] = {"families": fam, "worst_rtn": {m: v["rtn_output_error"] for m, v in worst}}
        print(f"[bench] layer errors: {stage or 'none'} done", file=sys.stderr, flush=True)
    return out


def compare_codes(peer_dir: str) -> dict:
    """Our RTN W4 sym g64 codes vs a compressed-tensors pack-quantized checkpoint of the same weights
    (llm-compressor's w4-rtn, bench/peer_llmcompressor.py): the share of weights whose dequantized value
    differs, and of those, the share where ours is smaller in magnitude (a tie w/s = k + ½ broken
    toward zero: our scale is rounded up to fp32, theirs down)."""
    from safetensors.torch import load_file

    from spinfx.checkpoint.hf import smollm2_dir
    from spinfx.kernels.quant_rtn import quantize_rtn
    from spinfx.kernels.quant_weight import dequantize

    a, b = load_file(str(smollm2_dir() / "model.safetensors")), load_file(f"{peer_dir}/model.safetensors")
    differ = total = smaller = 0
    for k, w in a.items():
        if not k.endswith("proj.weight"):
            continue
        name, w = k.removesuffix(".weight"), w.double()
        ours = dequantize(quantize_rtn(w, 4, 64, True, scale_dtype=torch.float32), torch.float64)
        p, sb = b[f"{name}.weight_packed"], b[f"{name}.weight_scale"].double()
        u = torch.stack([(p >> (4 * i)) & 15 for i in range(8)], -1).reshape(p.shape[0], -1).double()
        theirs = ((u - 8).view(w.shape[0], -1, 64) * sb[..., None]).view_as(w)
        d = (theirs - ours).abs() > 1e-6
        differ, total = differ + d.sum().item(), total + w.numel()
        smaller += (d & (ours.abs() < theirs.abs())).sum().item()
    return {"differ": differ / total, "ours_smaller": smaller / max(differ, 1)}


def norm_analysis(windows: int = 4) -> dict:
    """Where the normalized residual stream's energy sits vs the RMSNorm scales γ, per norm, on
    `windows` calibration windows (other plays than Hamlet), float model.

    For a linear after an RMSNorm, y = W (γ ⊙ x̂). Without rotation RTN's error ΔW meets γ ⊙ x̂; a
    rotation needs γ folded into W first (W diag γ, then R1), so the error meets x̂ itself, spread
    evenly over all channels. With e_j = E[x̂_j²]:
      top1_share  = max_j e_j / Σ e_j             (a massive channel)
      gamma_top   = γ at that channel / RMS(γ)
      shield      = RMS(γ)² · Σ e_j / Σ γ_j² e_j  (> 1: γ is small where x̂ is large, so the unrotated
                    error is damped there; isotropic error after fold+rotation loses that factor)."""
    model, tok = load_model("smollm2")
    calib = calibration_tokens(tok, CTX, windows, exclude="hamlet").reshape(windows, 1, CTX)
    acc: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(mod, args):
            x = args[0].double()
            xh = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)
            acc[name] = acc.get(name, 0) + xh.pow(2).reshape(-1, x.shape[-1]).mean(0) / windows
        return fn

    norms = {n: m for n, m in model.named_modules() if n.endswith("layernorm")}
    hs = [m.register_forward_pre_hook(hook(n)) for n, m in norms.items()]
    with torch.no_grad():
        for ids in calib:
            model(input_ids=ids, use_cache=False)
    for h in hs:
        h.remove()
    out = {}
    for n, e in acc.items():
        g = norms[n].weight.detach().double()
        j = int(e.argmax())
        rms_g2 = g.pow(2).mean()
        out[n] = {"top1_share": (e[j] / e.sum()).item(), "top1_channel": j,
                  "gamma_top": (g[j].abs() / rms_g2.sqrt()).item(),
                  "shield": (rms_g2 * e.sum() / (g.pow(2) * e).sum()).item()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=39,
                    help="evaluation windows of 512 tokens of Hamlet (39: the first 20,000 tokens, TESTBED.md)")
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--only", help="comma-separated config names: " + ", ".join(CONFIGS))
    ap.add_argument("--weights-only", action="store_true")
    ap.add_argument("--norms-only", action="store_true", help="the RMSNorm γ vs residual-energy analysis alone")
    ap.add_argument("--compare-codes", metavar="DIR",
                    help="our W4 g64 RTN codes vs llm-compressor's w4-rtn checkpoint DIR (ties on the Q4_1 grid)")
    ap.add_argument("--layer-errors", action="store_true",
                    help="per weight family RTN/GPTQ output errors with no rewrite, fold, R1+R2, spinquant (4 windows)")
    ap.add_argument("--json", help="append one JSON object per result to this file")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (1 on a loaded machine: parallel regions wait for descheduled threads)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = open(args.json, "a") if args.json else None

    def emit(obj: dict) -> None:
        if out:
            out.write(json.dumps(obj) + "\n")
            out.flush()

    if args.compare_codes:
        print(json.dumps(compare_codes(args.compare_codes)))
        return
    if args.norms_only:
        rows = norm_analysis()
        emit({"norms": rows})
        print("| norm | top channel | its share of Σ E[x̂²] | γ there / RMS γ | shield |")
        print("|---|---:|---:|---:|---:|")
        for n, r in rows.items():
            print(f"| {n} | {r['top1_channel']} | {r['top1_share']:.1%} | {r['gamma_top']:.3f} | {r['shield']:.2f} |")
        return
    if args.layer_errors:
        _, tok = load_model("smollm2")
        stages = layer_errors(calibration_tokens(tok, CTX, 4, exclude="hamlet"))
        emit({"layer_errors": stages})
        print("| rewrite | " + " | ".join(FAMILIES) + " |")
        print("|---|" + "---:|" * len(FAMILIES))
        for stage, r in stages.items():
            print(f"| {stage} | " + " | ".join(f"{r['families'][f]['rtn_output_error']:.3f} "
                                              f"({r['families'][f]['output_error']:.3f})" for f in FAMILIES) + " |")
        for stage, r in stages.items():
            print(f"{stage}: worst RTN layers {r['worst_rtn']}")
        return
    if args.weights_only:
        stages = weight_analysis()
        emit({"weights": stages})
        print("| stage | weights | kurtosis | groups on a Q4_1 grid | RTN W4 sym g64 | RTN W4 asym g32 | RTN W3 sym g64 |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for stage, rows in stages.items():
            for fam, r in rows.items():
                print(f"| {stage} | {fam} | {r['kurtosis']:.2f} | {r['q4_1_grid']:.1%} | {r['rtn_w4_sym_g64']:.4f} "
                      f"| {r['rtn_w4_asym_g32']:.4f} | {r['rtn_w3_sym_g64']:.4f} |", flush=True)
        return
    names = args.only.split(",") if args.only else list(CONFIGS)
    _, tok = load_model("smollm2")
    calib = calibration_tokens(tok, CTX, args.calib_windows, exclude="hamlet")
    print(f"| config | ppl (Hamlet, {args.windows}×{CTX}) | bits/weight | mean ‖W−Ŵ‖/‖W‖ | quantize s | "
          f"of which quantizing s | eval s |")
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for name in names:
        row = run_config(name, args.windows, calib)
        emit(row)
        print(f"| {row['label']} | {row['ppl']:.2f} | {row.get('bits_per_weight', 32):.3f} | "
              f"{row.get('error_mean', 0):.4f} | {row.get('quantize_s', '')} | {row.get('quantizing_s', '')} | "
              f"{row['eval_s']} |", flush=True)


if __name__ == "__main__":
    main()
