"""shard: tensor parallelism (tp = T, rank = r) decided from the graph, certified in float64.

Which linears are column- or row-parallel, and their layouts: spinfx.passes.shard_plan.

The rank-local graph: every value between a column-parallel linear and its row-parallel reader carries a
sharded axis, followed op by op (reshape/view, transpose, expand, slice/split of fused outputs, rope,
attention, online Hadamards); shape arguments are rewritten to local sizes (local head counts in the
view nodes, GQA's repeat count), slices of fused outputs to local part boundaries. An op with no rule,
a reduction over the sharded axis, or a Hadamard whose block does not divide the local size is
refused with `Unsupported` naming the node, the dimension and T.

Quantized linears (spinfx::qlinear) shard their packed tensors with the same specs (rows: packed
weight, scales, zeros, bias; columns: unpack/slice/repack, scales per aligned group, else replicated
scales plus the rank's slice of the global group index — exact for any split).

Certificate: the pass builds all T rank programs and runs them together in one process (threads, the
all_reduce summing in rank order) in float64 on seeded random inputs against the unsharded program;
relative max |Δ| ≤ 1e-10 or the pass fails.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.fx as fx

from spinfx.engine.errors import BadInput, Unsupported
from spinfx.engine.graph import Program, add_const, drop_const, infer_meta
from spinfx.engine.match import describe
from spinfx.engine.pipeline import Context, Pass, PassResult
from spinfx.kernels import tp_specs as specs
from spinfx.passes.options import check_fields
from spinfx.passes.shard_plan import (Ann, Seg, ShardPlan, hadamard_op, module_of_linear, plan_shard, qlinear_op, shape_of,
                                      shardable_linear)
from spinfx.patterns.common import ACTIVATIONS, ALL_REDUCE, WAIT_TENSOR

aten = torch.ops.aten
UNARY = {aten.neg.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.contiguous.default,
         aten.clone.default, aten.alias.default, aten.exp.default, aten.pow.Tensor_Scalar,
         aten.mul.Scalar, aten.div.Scalar, aten.add.Scalar, aten.rsqrt.default, aten.sqrt.default,
         *ACTIVATIONS}
BINARY = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.where.self}
REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}  # (x, dims, keepdim): per-head norms


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None



# ---- the rank-local graph: follow the sharded axis ------------------------------------------------


def _G(seg: Seg) -> int:
    return sum(g for g, _ in seg)


def _L(seg: Seg) -> int:
    return sum(l for _, l in seg)


def _map_bound(seg: Seg, pos: int, what: str) -> tuple[int, int]:
    """(part index, local offset) of a global boundary `pos` on a segmented axis."""
    gcum = lcum = 0
    for i, (g, l) in enumerate(seg):
        if pos == gcum:
            return i, lcum
        gcum += g
        lcum += l
    if pos == gcum:
        return len(seg), lcum
    raise Unsupported(f"shard: {what} cuts the sharded axis at {pos}, inside a part "
                      f"(parts {[g for g, _ in seg]}): it would mix ranks' features")


class _Follower:
    def __init__(self, prog: Program, plan: ShardPlan, rank: int):
        self.prog, self.plan, self.tp, self.rank = prog, plan, plan.tp, rank
        self.ann: dict[fx.Node, object] = {}
        self.q_ratio = Fraction(1, plan.tp)

    def run(self) -> None:
        g = self.prog.graph
        stops = {lin for lin, lay in self.plan.layouts.items() if lay.kind == "row"}
        region: set[fx.Node] = set()
        stack = list(self.plan.seeds)
        while stack:
            n = stack.pop()
            for u in n.users:
                if u not in region and u not in stops:
                    region.add(u)
                    stack.append(u)
        for n, a in self.plan.seeds.items():
            self.ann[n] = a
        for n in g.nodes:
            if n in region:
                self._node(n)
        for s in stops:
            a = self.ann.get(s.args[0])
            lay = self.plan.layouts[s]
            want = {len(shape_of(s.args[0])) - 1: ((lay.k, lay.local_k()),)}
            if a is None or not isinstance(a, dict) or {ax: ((_G(sg), _L(sg)),) for ax, sg in a.items()} != want:
                raise Unsupported(f"shard: {describe(s)} reads {describe(s.args[0])}, which is not split by its "
                                  f"input features as a row-parallel layer needs (K = {lay.k}, T = {self.tp})")

    def _get(self, a) -> Ann | None:
        if isinstance(a, fx.Node):
            return self.ann.get(a)
        return None

    def _fail(self, n: fx.Node, why: str):
        raise Unsupported(f"shard: {describe(n)} {why} (T = {self.tp})")

    def _node(self, n: fx.Node) -> None:
        if n.op == "output":
            self._fail(n, "returns a value that is split across ranks")
        if n.op != "call_function":
            self._fail(n, "is not an op the shard pass knows")
        if shardable_linear(n) or n.target is aten.addmm.default:
            self._fail(n, "reads a split value but is neither column- nor row-parallel")
        rule = propagation().get(n.target)
        if rule is None:
            self._fail(n, "has no sharding rule")
        self.ann[n] = rule(self, n, self._get(n.args[0]) if n.args else None)

    # -- rules: (node, its first operand's annotation) → the node's annotation (the table: `propagation`) --
    def _transpose(self, n: fx.Node, a: Ann) -> Ann:
        nd = len(shape_of(n))
        d0, d1 = (d % nd for d in n.args[1:3])
        sw = {d0: d1, d1: d0}
        return {sw.get(ax, ax): s for ax, s in a.items()}

    def _permute(self, n: fx.Node, a: Ann) -> Ann:
        perm = [d % len(shape_of(n)) for d in n.args[1]]
        return {perm.index(ax): s for ax, s in a.items()}

    def _unsqueeze(self, n: fx.Node, a: Ann) -> Ann:
        d = n.args[1] % len(shape_of(n))
        return {(ax + 1 if ax >= d else ax): s for ax, s in a.items()}

    def _getitem(self, n: fx.Node, a: Ann) -> Ann:
        return self.ann[n.args[0]][n.args[1]]

    def _unary(self, n: fx.Node, a: Ann) -> Ann:
        if len(n.args) > 1 and isinstance(n.args[1], fx.Node) and n.args[1] in self.ann:
            self._fail(n, "has two split operands")
        return dict(a)

    def _reduction(self, n: fx.Node, a: Ann) -> Ann:
        nd = len(shape_of(n.args[0]))
        dims = sorted(d % nd for d in n.args[1])
        if any(d in a for d in dims):
            self._fail(n, "reduces over the split axis")
        keep = len(n.args) > 2 and n.args[2]
        return dict(a) if keep else {ax - sum(d < ax for d in dims): sg for ax, sg in a.items()}

    def _softmax(self, n: fx.Node, a: Ann) -> Ann:
        if n.args[1] % len(shape_of(n)) in a:
            self._fail(n, "normalizes over the split axis")
        return dict(a)

    def _hadamard(self, n: fx.Node, a: Ann) -> Ann:
        last = len(shape_of(n)) - 1
        if last in a:
            seg = a[last]
            block = int(n.args[2])
            if len(seg) != 1 or _L(seg) % block:
                self._fail(n, f"is an online Hadamard with block {block} over the split axis: the block must "
                              f"divide the local size {_G(seg)}/T = {_L(seg)} (rotate: r4_block)")
        return dict(a)

    def _reshape(self, n: fx.Node, a: Ann) -> Ann:
        ins, outs = shape_of(n.args[0]), shape_of(n)
        blocks, i, j = [], 0, 0
        while i < len(ins) or j < len(outs):
            bi, bo, pi, po = [], [], 1, 1
            if i < len(ins):
                bi.append(i); pi *= ins[i]; i += 1  # noqa: E702
            if j < len(outs):
                bo.append(j); po *= outs[j]; j += 1  # noqa: E702
            while pi != po:
                if pi < po and i < len(ins):
                    bi.append(i); pi *= ins[i]; i += 1  # noqa: E702
                elif j < len(outs):
                    bo.append(j); po *= outs[j]; j += 1  # noqa: E702
                else:
                    self._fail(n, "reshapes in a way the shard pass cannot follow")
            blocks.append((bi, bo))
        new = list(outs)
        out: Ann = {}
        for bi, bo in blocks:
            hit = [ax for ax in bi if ax in a]
            if not hit:
                continue
            if len(bi) == 1 and len(bo) == 1 and ins[bi[0]] == outs[bo[0]]:
                out[bo[0]] = a[bi[0]]
                new[bo[0]] = _L(a[bi[0]])
                continue
            if any(len(a[ax]) != 1 for ax in hit):
                self._fail(n, "reshapes a split axis that still holds several parts (slice the fused output first)")
            gin = 1
            lin = 1
            for ax in bi:
                gin *= ins[ax]
                lin *= _L(a[ax]) if ax in a else ins[ax]
            tgt = next((ax for ax in bo if outs[ax] > 1 and (outs[ax] * lin) % gin == 0), None)
            if tgt is None:
                self._fail(n, f"reshapes the split axis {ins} -> {outs} so that no dimension takes the local size")
            loc = outs[tgt] * lin // gin
            out[tgt] = ((outs[tgt], loc),)
            new[tgt] = loc
        n.args = (n.args[0], new) + tuple(n.args[2:])
        return out

    def _expand(self, n: fx.Node, a: Ann) -> Ann:
        ins, sizes = shape_of(n.args[0]), list(n.args[1])
        off = len(sizes) - len(ins)
        out: Ann = {}
        for ax, seg in a.items():
            o = ax + off
            if sizes[o] != -1:
                sizes[o] = _L(seg)
            out[o] = seg
            nxt = o + 1
            ratio = Fraction(_L(seg), _G(seg))
            # GQA's repeat_kv right after the kv-head axis: repeat up to the local query heads
            if (nxt < len(sizes) and ax + 1 < len(ins) and ins[ax + 1] == 1 and sizes[nxt] not in (1, -1)
                    and ratio != self.q_ratio and nxt - off not in a):
                rep = Fraction(sizes[nxt]) * self.q_ratio / ratio
                if rep.denominator != 1:
                    self._fail(n, f"repeats kv heads {sizes[nxt]}× which cannot become local query heads")
                out[nxt] = ((sizes[nxt], int(rep)),)
                sizes[nxt] = int(rep)
        n.args = (n.args[0], sizes) + tuple(n.args[2:])
        return out

    def _slice(self, n: fx.Node, a: Ann) -> Ann:
        nd = len(shape_of(n))
        args = list(n.args) + [None] * (5 - len(n.args))
        dim = (args[1] if args[1] is not None else 0) % nd
        if dim not in a:
            return dict(a)
        if args[4] not in (None, 1):
            self._fail(n, "slices the split axis with a step")
        seg = a[dim]
        total = _G(seg)
        start = 0 if args[2] is None else min(max(args[2] + total if args[2] < 0 else args[2], 0), total)
        end = total if args[3] is None else min(max(args[3] + total if args[3] < 0 else args[3], 0), total)
        i, ls = _map_bound(seg, start, describe(n))
        j, le = _map_bound(seg, end, describe(n))
        n.args = (n.args[0], args[1], ls, le) + ((args[4],) if len(n.args) > 4 else ())
        return {**a, dim: seg[i:j]}

    def _split(self, n: fx.Node, a: Ann) -> list:
        nd = len(shape_of(n.args[0]))
        dim = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % nd
        pieces = [int(v.shape[dim]) for v in n.meta["val"]]
        if dim not in a:
            return [dict(a) for _ in pieces]
        seg = a[dim]
        outs, locs, pos = [], [], 0
        for p in pieces:
            i, ls = _map_bound(seg, pos, describe(n))
            j, le = _map_bound(seg, pos + p, describe(n))
            outs.append({**a, dim: seg[i:j]})
            locs.append(le - ls)
            pos += p
        if len(set(locs)) == 1:
            n.target = aten.split.Tensor
            n.args = (n.args[0], locs[0], dim)
        else:
            n.target = aten.split_with_sizes.default
            n.args = (n.args[0], locs, dim)
        n.kwargs = {}
        return outs

    def _cat(self, n: fx.Node, a: Ann = None) -> Ann:
        items = n.args[0]
        dim = (n.args[1] if len(n.args) > 1 else 0) % len(shape_of(n))
        anns = [self._get(x) for x in items]
        if any(x is None for x in anns):
            self._fail(n, "concatenates a split value with a whole one")
        if any(x != anns[0] for x in anns) or dim in anns[0]:
            self._fail(n, "concatenates along the split axis or mixes differently split values")
        return dict(anns[0])

    def _binary(self, n: fx.Node, a: Ann = None) -> Ann:
        nd = len(shape_of(n))
        out: Ann = {}
        for x in n.args[:3]:
            a = self._get(x)
            if a is None:
                continue
            off = nd - len(shape_of(x))
            for ax, s in a.items():
                if out.get(ax + off, s) != s:
                    self._fail(n, "combines values split in different ways")
                out[ax + off] = s
        for x in n.args[:3]:
            if isinstance(x, fx.Node) and self._get(x) is None and isinstance(_val(x), torch.Tensor):
                shp = shape_of(x)
                off = nd - len(shp)
                for ax in out:
                    if ax - off >= 0 and shp[ax - off] != 1:
                        self._fail(n, f"combines a split value with the whole {describe(x)} of shape {shp}")
        return out

    def _sdpa(self, n: fx.Node, a: Ann = None) -> Ann:
        q, k, v = (self._get(x) for x in n.args[:3])
        if q is None or k is None or v is None or set(q) != {1} or set(k) != {1} or set(v) != {1}:
            self._fail(n, "attends over values that are not all split by heads")
        ql, kl = _L(q[1]), _L(k[1])
        gqa = bool(n.kwargs.get("enable_gqa", False))
        if kl != ql and not (gqa and ql % kl == 0):
            self._fail(n, f"pairs {ql} local query heads with {kl} local kv heads")
        mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node) and len(shape_of(mask)) == 4 and shape_of(mask)[1] != 1:
            self._fail(n, f"uses a per-head mask {describe(mask)}")
        return {1: q[1]}

    def _matmul(self, n: fx.Node, a: Ann = None) -> Ann:
        a, b = self._get(n.args[0]), self._get(n.args[1])
        nd = len(shape_of(n))
        out: Ann = {}
        for x, ann in ((n.args[0], a), (n.args[1], b)):
            if ann is None:
                self._fail(n, "multiplies a split value with a whole one")
            off = nd - len(shape_of(x))
            for ax, s in ann.items():
                if ax + off >= nd - 2:
                    self._fail(n, "contracts or indexes the split axis")
                if out.get(ax + off, s) != s:
                    self._fail(n, "multiplies values split in different ways")
                out[ax + off] = s
        return out


# ---- weights and collectives -------------------------------------------------------------------


_QROLES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx")


@functools.cache
def propagation() -> dict:
    """The op → rule table: how a value split across ranks passes each op (`_Follower._node` applies it;
    an op with no entry is refused)."""
    F = _Follower
    table = {**dict.fromkeys(UNARY, F._unary), **dict.fromkeys(BINARY, F._binary),
             **dict.fromkeys(REDUCTIONS, F._reduction)}
    table.update({
        aten.reshape.default: F._reshape, aten.view.default: F._reshape, aten.transpose.int: F._transpose,
        aten.permute.default: F._permute, aten.unsqueeze.default: F._unsqueeze, aten.expand.default: F._expand,
        aten.slice.Tensor: F._slice, aten.split.Tensor: F._split, aten.split_with_sizes.default: F._split,
        operator.getitem: F._getitem, aten.cat.default: F._cat, aten.matmul.default: F._matmul,
        aten.scaled_dot_product_attention.default: F._sdpa, aten.softmax.int: F._softmax,
        aten._softmax.default: F._softmax, hadamard_op(): F._hadamard,
    })
    return table


def _shard_linear(prog: Program, lin: fx.Node, lay: specs.Layout, rank: int) -> dict | None:
    """Replace the constants of one linear by rank `rank`'s shard; returns the new QuantWeight fields."""
    args = list(lin.args)
    quant = lin.target is qlinear_op()
    slots = {"weight_packed": 1, "weight_scale": 2, "weight_zero_point": 3, "weight_g_idx": 4, "bias": 5} if quant \
        else {"weight": 1, "bias": 2}
    tensors = {kind: prog.const(args[i].target) for kind, i in slots.items()
               if i < len(args) and isinstance(args[i], fx.Node)}
    local = specs.shard_tensors(lay, tensors, rank, zp_packed=False)
    for kind, i in slots.items():
        node = args[i] if i < len(args) else None
        if isinstance(node, fx.Node):
            if kind in local:
                prog.set_const(node.target, local[kind])
                node.meta.pop("val", None)
            else:  # the row-parallel bias on ranks > 0
                args[i] = None
        elif kind in local:  # a synthesized global group index slice
            args[i] = add_const(prog.gm, f"{module_of_linear(lin)}.{kind}", local[kind], before=lin)
    if quant and lay.kind == "row" and lay.group_size is None and args[4] is None:
        args[7] = lay.local_k()  # per channel is group_size = K
    if not quant and len(args) > 2 and args[2] is None:
        args = args[:2]
    old = [a for a in lin.args if isinstance(a, fx.Node) and a not in args]
    lin.args = tuple(args)
    for a in old:
        drop_const(prog, a)
    return local if quant else None


def _all_reduce(prog: Program, row: fx.Node, group: str) -> fx.Node:
    g = prog.graph
    with g.inserting_after(row):
        red = g.call_function(ALL_REDUCE, (row, "sum", group))
    with g.inserting_after(red):
        wait = g.call_function(WAIT_TENSOR, (red,))
    for n in (red, wait):
        n.meta = {"module": row.meta.get("module", ""), "module_type": "all-reduce"}
    row.replace_all_uses_with(wait, delete_user_cb=lambda u: u is not red)
    return wait


def default_group() -> str:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD.group_name
    return "spinfx-simulated"


def shard_program(prog: Program, tp: int, rank: int, group: str | None = None,
                  attention: str = "shard") -> ShardPlan:
    """Rewrite `prog` in place into rank `rank`'s program of a T-way tensor-parallel model."""
    if not 0 <= rank < tp:
        raise Unsupported(f"shard: rank {rank} is not in [0, T = {tp})")
    plan = plan_shard(prog, tp, attention)
    _Follower(prog, plan, rank).run()
    new_quant = {}
    for lin, lay in plan.layouts.items():
        local = _shard_linear(prog, lin, lay, rank)
        if local is not None:
            new_quant[module_of_linear(lin)] = (lin, local)
    group = group or default_group()
    for lin, lay in plan.layouts.items():
        if lay.kind == "row":
            _all_reduce(prog, lin, group)
    for n in prog.graph.nodes:
        if n.op in ("call_function", "get_attr"):
            n.meta.pop("val", None)
    infer_meta(prog.gm)
    prog.gm.recompile()
    _update_quant_meta(prog, new_quant)
    prog.meta["tp"] = {"tp": tp, "rank": rank, "group": group, "attention": attention,
                       "layouts": {m: lay.to_dict() for m, lay in plan.by_module().items()}}
    return plan


def _update_quant_meta(prog: Program, new_quant: dict) -> None:
    """Drivers read quantized weights from prog.meta['quant'] (module -> record with a `weight`): keep
    those records in step with the rank's tensors."""
    from spinfx.kernels.quant_weight import QuantWeight

    quant = prog.meta.get("quant")
    if not quant:
        return
    out = dict(quant)
    for module, (lin, local) in new_quant.items():
        rec = quant.get(module)
        if rec is None or not isinstance(getattr(rec, "weight", None), QuantWeight):
            continue
        k = shape_of(lin.args[0])[-1]
        gs, g_idx, scale = rec.weight.group_size, local.get("weight_g_idx"), local["weight_scale"]
        if gs is not None and g_idx is None and scale.shape[1] * gs != k:
            gs = k  # a group as wide as K (K = group) split by a row layout: one group per local row
        qw = QuantWeight(weight_packed=local["weight_packed"], weight_scale=scale,
                         weight_zero_point=local.get("weight_zero_point"), weight_g_idx=g_idx,
                         bits=int(lin.args[6]), group_size=gs, weight_shape=(int(local["weight_packed"].shape[0]), k),
                         bias=local.get("bias"))
        out[module] = dataclasses.replace(rec, weight=qw)
    prog.meta["quant"] = out


# ---- the pass -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard(Pass):
    """shard: the rank-local program of T-way tensor parallelism (module docstring)."""

    name = "shard"
    certify = False  # certified inside run(): all T ranks together against the unsharded program
    changes_weights = True
    tp: int = 1
    rank: int = 0
    group: str | None = None     # process-group name for the collectives (default: WORLD, if initialized)
    attention: str = "shard"     # "replicate": keep attention whole, split only the MLPs
    check: bool = True           # certify (builds and runs all T rank programs in float64)

    def validate(self) -> None:
        check_fields(self, self.name)
        if self.tp < 1 or not 0 <= self.rank < self.tp:
            raise BadInput(f"shard: tp must be a positive integer and 0 <= rank < tp, got tp={self.tp}, rank={self.rank}")
        if self.attention not in ("shard", "replicate"):
            raise BadInput(f"shard: attention must be 'shard' or 'replicate', not {self.attention!r}")

    def run(self, prog: Program, ctx: Context) -> PassResult:
        res = PassResult(self.name, self.options())
        if self.tp == 1:
            res.notes.append("tp = 1: nothing to shard")
            return res
        before = prog.clone() if self.check else None
        plan = shard_program(prog, self.tp, self.rank, self.group, self.attention)
        counts = {"column": sum(l.kind == "column" for l in plan.layouts.values()),
                  "row": sum(l.kind == "row" for l in plan.layouts.values()),
                  "attention": sum(s.kind == "attention" for s in plan.sites),
                  "mlp": sum(s.kind == "mlp" for s in plan.sites)}
        res.findings["counts"] = counts
        att = next((s.info for s in plan.sites if s.kind == "attention"), None)
        if att:
            h, kv = att["heads"], att["kv_heads"]
            res.findings["heads"] = {"q_per_rank": h // self.tp, "kv_per_rank": max(kv // self.tp, 1),
                                     "kv_replicated": self.tp > kv}
            if self.tp > kv:
                res.notes.append(f"T = {self.tp} > {kv} kv heads: each kv head is replicated on "
                                 f"{self.tp // kv} ranks, each with the query heads that use it")
        synth = sorted(module_of_linear(n) for n, l in plan.layouts.items() if l.synth_g_idx)
        if synth:
            res.notes.append(f"K/T not a multiple of the group size in {len(synth)} row-parallel layer(s): scales "
                             f"replicated, each rank reads its slice of the global group index ({synth[0]}, …)")
        res.notes.append("embeddings, norms and lm_head are replicated"
                         + ("; attention replicated (attention: replicate)" if self.attention == "replicate" else ""))
        if before is not None:
            from spinfx.passes.shard_ranks import certify_sharded

            res.certificate = certify_sharded(before, self.tp, prog, self.rank, tol=self.tolerance, what=self.name,
                                              attention=self.attention)
        return res
