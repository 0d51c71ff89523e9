"""Run a network segment by segment: each pass computes only what changed since the last one.

A `SegmentRunner` keeps, in an `ActivationStore`, the tensors of the calibration set that later
passes still need (the cut between what has run and what has not). Asked for some tensors, it
builds the smallest sub-graph from stored tensors and the model inputs to them, runs it over
the calibration batches and stores its outputs and the new cut. When layers are pruned, the
stored tensors downstream of them are dropped, except the consumers' inputs, which only lose
the removed channels' positions (the kept channels' values do not change).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_thinet.calibration.batch_axis import runs_per_sample
from onnx_thinet.calibration.runtime import ONNXRUNTIME_ERRORS, make_session
from onnx_thinet.calibration.store import ActivationStore
from onnx_thinet.io.data import CalibrationData
from onnx_thinet.io.graph import graph_inputs
from onnx_thinet.io.weightless import is_session_array, weight_stub

__all__ = ["Batching", "NodeIndex", "SegmentRunner", "downstream_nodes", "fixed_batch"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batching:
    """Calibration images `indices` cut into batches of `size`, run `run_size` at a time.

    A model with a fixed batch dimension runs pieces of exactly `run_size` images (the last one
    padded); statistics still see batches of `size`, so a batch-1 model costs no more Python.
    """

    indices: np.ndarray
    size: int
    run_size: int | None = None  # the model's fixed batch; None: any

    @property
    def count(self) -> int:
        return -(-len(self.indices) // self.size)

    def rows(self, batch: int) -> np.ndarray:
        return self.indices[batch * self.size : (batch + 1) * self.size]

    def first_image(self, batch: int) -> int:
        return batch * self.size


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size every input of `model` fixes (its first dim), or None when it is free."""
    sizes = set()
    for value in graph_inputs(model):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            sizes.add(int(dims[0].dim_value))
    return min(sizes) if sizes else None


class SegmentRunner:
    """One model's stored activations over the calibration batches, advanced segment by segment."""

    def __init__(self, data: CalibrationData, batching: Batching, store: ActivationStore,
                 device: str, timings: dict[str, float], fixed_model: bool = False):
        self.data, self.batching, self.store = data, batching, store
        self.device, self.timings = device, timings
        self.runs = 0
        # the original network never changes: one index serves every pass (the U-Net's was
        # built 323 times); a pruned copy changes in place between calls: indexed each time
        self.fixed_model = fixed_model
        self._fixed_index: tuple[onnx.ModelProto, NodeIndex] | None = None

    def _index(self, model: onnx.ModelProto) -> NodeIndex:
        if not self.fixed_model:
            return NodeIndex(model)
        if self._fixed_index is None or self._fixed_index[0] is not model:
            self._fixed_index = (model, NodeIndex(model))
        return self._fixed_index[1]

    def ensure(self, model: onnx.ModelProto, targets: Sequence[str]) -> None:
        """Compute `targets` for every batch (and store them with the cut later passes need)."""
        graph = self._index(model)
        nodes = graph.needed_nodes(targets, self._available(graph))
        if not nodes:
            return
        produced = {out for node in nodes for out in node.output if out}
        keep = graph.cut(self._available(graph) | produced)
        outputs = sorted((set(targets) | (produced & keep)) - self._available(graph))
        inputs = sorted({i for n in nodes for i in n.input if i and i not in produced
                         and i not in graph.initializers})
        # with its arena: the store copies what it keeps in memory out of it; its batches run
        # back to back, so its threads may spin between them (ResNet-50: onnxruntime 6.8, 5.9 s
        # → 6.0, 5.6 s, alternating runs)
        segment, arrays = _segment_model(model, nodes, inputs, outputs)
        session = make_session(segment, self.device, arena=True, arrays=arrays, spin=True)
        graph_feeds = set(graph.inputs)
        whole = self.batching.run_size is not None and runs_per_sample(nodes, model)
        shapes = _known_shapes(model, outputs)
        for batch in range(self.batching.count):
            clock = time.perf_counter()
            feeds = self._feeds(batch, inputs, graph_feeds)
            self.timings["io"] = self.timings.get("io", 0.0) + time.perf_counter() - clock
            clock = time.perf_counter()
            values, borrowed = self._run(session, outputs, feeds, whole, shapes)
            self.timings["onnxruntime"] = self.timings.get("onnxruntime", 0.0) + time.perf_counter() - clock
            if borrowed:  # onnxruntime's own outputs: their shapes serve the next batches
                shapes = _learned_shapes(values, len(next(iter(feeds.values()))))
            for name, value in zip(outputs, values):
                self.store.put(name, batch, value, borrowed=borrowed)
        self.runs += 1

    def get(self, name: str, batch: int) -> np.ndarray:
        return self.store.get(name, batch)

    def prune(self, model: onnx.ModelProto, future: Iterable[str] = (), needed: Iterable[str] = ()) -> None:
        """Drop stored tensors that no later computation needs (call between passes).

        Stored tensors downstream of `future` nodes (to be cut by later passes) will be
        recomputed, so what they are computed from is kept too (a U-Net's skip tensors).
        What later passes will ask for (`needed`) is kept computable from what stays.
        """
        self._prune(self._index(model), future, needed)

    def _prune(self, graph: NodeIndex, future: Iterable[str], needed: Iterable[str] = ()) -> None:
        available = self._available(graph)
        unstable = graph.downstream_tensors(future)
        keep = graph.cut(available, needed) | graph.cut(available - unstable, needed)
        for name in self.store.names():
            if name not in keep:
                self.store.drop(name)

    def invalidate(self, model: onnx.ModelProto, changed: Iterable[str],
                   deletions: dict[str, tuple[int, np.ndarray]], exact: Iterable[str] = (),
                   future: Iterable[str] = ()) -> None:
        """Forget what depends on the `changed` nodes of the (pruned) `model`.

        `deletions[tensor] = (axis, positions)` marks a consumer input whose stored values stay
        valid once those positions are deleted; it must not lie downstream of `exact` nodes
        (consumers whose weights changed), which invalidate everything after them.
        """
        graph = self._index(model)
        stale = graph.downstream_tensors(changed)
        rewritten = graph.downstream_tensors(exact)
        for name in self.store.names():
            if name not in stale:
                continue
            if name in deletions and name not in rewritten:
                axis, positions = deletions[name]
                self.store.delete_positions(name, axis, positions)
            else:
                self.store.drop(name)
        self._prune(graph, future)

    def _available(self, graph: NodeIndex) -> set[str]:
        return {name for name in self.store.names() if name in self.store} | set(graph.inputs)

    def _feeds(self, batch: int, inputs: list[str], graph_feeds: set[str]) -> dict[str, np.ndarray]:
        feeds = {}
        if graph_feeds & set(inputs):
            feeds.update(self.data.batch(self.batching.rows(batch)))
        for name in inputs:
            if name not in graph_feeds:
                feeds[name] = self.store.get(name, batch)
        return {k: v for k, v in feeds.items() if k in inputs}

    def _run(self, session, outputs: list[str], feeds: dict[str, np.ndarray], whole: bool = False,
             shapes: list[tuple[tuple[int, ...], np.dtype]] | None = None) -> tuple[list[np.ndarray], bool]:
        """Run one batch; a model with a fixed batch runs it in pieces, the last one padded,
        unless the segment computes each image alone (`whole`, see `runs_per_sample`).

        Returns the outputs and whether they are onnxruntime's (in its arena, to be copied if
        kept). With the outputs' `shapes` past the batch axis, they are written into arrays
        of our own instead: copying them out of the arena cost ResNet-50 5.8 s for 5 GB.
        """
        rows = len(next(iter(feeds.values())))
        step = self.batching.run_size
        if step is None or rows == step:
            return _run_once(session, outputs, feeds, shapes, rows)
        if whole:
            try:
                values, borrowed = _run_once(session, outputs, feeds, shapes, rows)
            except ONNXRUNTIME_ERRORS:  # the table above was wrong about a node: run in pieces
                values = []
            if values and all(v.ndim and len(v) == rows for v in values):
                return values, borrowed
        pieces = []
        for start in range(0, rows, step):
            piece = {k: v[start : start + step] for k, v in feeds.items()}
            short = step - len(next(iter(piece.values())))
            if short:
                piece = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in piece.items()}
            pieces.append([value[: step - short] for value in session.run(outputs, piece)])
        return [np.concatenate(parts) for parts in zip(*pieces)], False


def _run_once(session, outputs: list[str], feeds: dict[str, np.ndarray], shapes, rows: int
              ) -> tuple[list[np.ndarray], bool]:
    """One run: into new arrays of the expected shapes when they are known, else onnxruntime's."""
    if shapes is not None:
        arrays = [np.empty((rows, *shape), dtype) for shape, dtype in shapes]
        inputs = {name: np.ascontiguousarray(value) for name, value in feeds.items()}  # alive for the run
        binding = session.io_binding()
        for name, value in inputs.items():
            binding.bind_cpu_input(name, value)
        for name, array in zip(outputs, arrays):
            binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        try:
            session.run_with_iobinding(binding, _QUIET)
            return arrays, False
        except (RuntimeError, *ONNXRUNTIME_ERRORS):  # a shape was not what it seemed (or the
            pass  # model cannot run: the plain run below says so with onnxruntime's own error)
    return session.run(outputs, feeds), True


def _quiet_run_options():
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


_QUIET = _quiet_run_options()


def _known_shapes(model: onnx.ModelProto, names: list[str]) -> list[tuple[tuple[int, ...], np.dtype]] | None:
    """Each tensor's dims past the batch axis and its type, when shape inference knows them all."""
    types = {v.name: v.type for v in [*model.graph.value_info, *model.graph.output]}
    shapes = []
    for name in names:
        kind = types.get(name)
        if kind is None or not kind.HasField("tensor_type") or not kind.tensor_type.HasField("shape"):
            return None
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in kind.tensor_type.shape.dim]
        if not dims or any(d <= 0 for d in dims[1:]):
            return None
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(kind.tensor_type.elem_type))
        except (KeyError, TypeError, ValueError):
            return None
        shapes.append((tuple(dims[1:]), dtype))
    return shapes


def _learned_shapes(values: list[np.ndarray], rows: int) -> list[tuple[tuple[int, ...], np.dtype]] | None:
    """The shapes of one batch's outputs for the next batches, when each leads with the batch."""
    if not all(v.ndim and len(v) == rows for v in values):
        return None
    return [(tuple(v.shape[1:]), v.dtype) for v in values]


class NodeIndex:
    """Producer/reader index of a model's nodes. Each node's name, inputs and outputs are read
    from the protobuf once: the walks below read them hundreds of times per pass (the U-Net's
    108 passes read node inputs 126,000 times)."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes = list(model.graph.node)
        self.names = [n.name for n in self.nodes]
        self.node_inputs = [_node_inputs(n) for n in self.nodes]
        self.node_outputs = [[o for o in n.output if o] for n in self.nodes]
        self.position = {name: k for k, name in enumerate(self.names)}
        self.producer_position = {out: k for k, outs in enumerate(self.node_outputs) for out in outs}
        self.reader_positions: dict[str, list[int]] = {}
        for k, inputs in enumerate(self.node_inputs):
            for name in inputs:
                self.reader_positions.setdefault(name, []).append(k)
        self.initializers = {t.name for t in model.graph.initializer}
        self.inputs = [v.name for v in graph_inputs(model)]
        self.outputs = [v.name for v in model.graph.output]

    def needed_nodes(self, targets: Iterable[str], available: set[str]) -> list[onnx.NodeProto]:
        """Nodes to run, in graph order, to get `targets` from `available` tensors."""
        chosen: set[int] = set()
        stack = [t for t in targets if t not in available]
        seen = set(stack)
        while stack:
            k = self.producer_position.get(stack.pop())
            if k is None or k in chosen:
                continue
            chosen.add(k)
            for name in self.node_inputs[k]:
                if name not in available and name not in self.initializers and name not in seen:
                    seen.add(name)
                    stack.append(name)
        return [self.nodes[k] for k in sorted(chosen)]

    def cut(self, available: set[str], needed: Iterable[str] = ()) -> set[str]:
        """Available tensors that the graph outputs and the `needed` tensors still need
        (walking back, stopping at them)."""
        keep: set[str] = set()
        seen: set[str] = set()
        stack = [*self.outputs, *needed]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in available:
                keep.add(name)
                continue
            k = self.producer_position.get(name)
            if k is not None:
                stack.extend(i for i in self.node_inputs[k] if i not in self.initializers)
        return keep

    def downstream_tensors(self, nodes: Iterable[str]) -> set[str]:
        return downstream_nodes(self, nodes)[1]


def downstream_nodes(graph: NodeIndex, names: Iterable[str]) -> tuple[set[str], set[str]]:
    """Node names reachable from the nodes `names` (included), and every tensor they produce."""
    nodes: set[str] = set()
    tensors: set[str] = set()
    stack = [graph.position[n] for n in names if n in graph.position]
    while stack:
        k = stack.pop()
        if graph.names[k] in nodes:
            continue
        nodes.add(graph.names[k])
        for out in graph.node_outputs[k]:
            if out not in tensors:
                tensors.add(out)
                stack.extend(graph.reader_positions.get(out, ()))
    return nodes, tensors


# standard ops whose attributes may hold subgraphs; other standard ops read their inputs alone
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """Inputs of a node, including those its subgraphs (If, Loop) read from the outer scope."""
    names = [i for i in node.input if i]
    if node.domain in ("", "ai.onnx") and node.op_type not in _SUBGRAPH_OPS:
        return names
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input}
            inner |= {t.name for t in sub.initializer}
            names += [i for n in sub.node for i in _node_inputs(n) if i not in inner]
    return names


def _segment_model(model: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: list[str],
                   outputs: list[str]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A model of `nodes` alone: `inputs` fed (stored tensors or model inputs), `outputs` read.

    Its large weights are stubs whose values are returned beside it (`make_session` takes
    them): one copy out of `model` instead of a protobuf copy and then an array copy.
    """
    graph = model.graph
    types = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}
    needed = {i for n in nodes for i in _node_inputs(n)}
    inits = [t for t in graph.initializer if t.name in needed]
    arrays = {t.name: numpy_helper.to_array(t) for t in inits if is_session_array(t)}
    new_graph = helper.make_graph(
        nodes, graph.name or "segment", [_value(types, name) for name in inputs],
        [_value(types, name) for name in outputs],
        [weight_stub(t) if t.name in arrays else t for t in inits],
    )
    segment = helper.make_model(new_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    segment.functions.extend(model.functions)
    return segment, arrays


def _value(types: dict[str, onnx.ValueInfoProto], name: str) -> onnx.ValueInfoProto:
    """The tensor's element type, shape left free (stored tensors may have lost channels)."""
    known = types.get(name)
    if known is not None and known.type.HasField("tensor_type"):
        return helper.make_tensor_value_info(name, known.type.tensor_type.elem_type, None)
    return helper.make_value_info(name, onnx.TypeProto())
