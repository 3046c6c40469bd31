"""Merge the first-step and cached-step decoder graphs into ``decoder_model_merged.onnx``.

One graph with a boolean ``use_cache_branch`` input and an ``If`` node: the ``else`` branch is the first
step (computes the cross-attention keys/values from ``encoder_hidden_states``), the ``then`` branch the
cached step. Weights live once, in the outer graph, shared by both branches: identical initializers are
found by content (the exporter names folded constants differently in the two traces).
"""

from __future__ import annotations

import hashlib

import onnx
from onnx import TensorProto, helper, numpy_helper

FLAG = "use_cache_branch"


def _content_key(tensor: onnx.TensorProto) -> str:
    array = numpy_helper.to_array(tensor)
    digest = hashlib.sha1(array.tobytes()).hexdigest()
    return f"{array.dtype}:{array.shape}:{digest}"


def hoist_constants(model: onnx.ModelProto, min_bytes: int = 1024) -> onnx.ModelProto:
    """Turn large ``Constant`` nodes (e.g. the sinusoidal position table) into initializers, so they dedupe."""
    kept = []
    for node in model.graph.node:
        value = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if value is not None and value.name == "value" and len(value.t.raw_data) >= min_bytes:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def _branch(
    model: onnx.ModelProto, prefix: str, shared: dict[str, str], outer_inputs: set[str]
) -> onnx.GraphProto:
    """The model's nodes as a subgraph: internal values prefixed, weights/inputs resolved to the outer scope."""
    graph = model.graph

    def rename(name: str) -> str:
        if not name or name in outer_inputs:
            return name
        return shared.get(name, f"{prefix}{name}")

    nodes = []
    for node in graph.node:
        if any(
            attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute
        ):
            raise ValueError(
                f"{node.op_type} node {node.name!r} has a subgraph; merging does not rename inside it"
            )
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = f"{prefix}{node.name}"
        new.input[:] = [rename(name) for name in node.input]
        new.output[:] = [rename(name) for name in node.output]
        nodes.append(new)
    produced = {name for node in nodes for name in node.output}
    outputs = []
    for output in graph.output:
        name = rename(output.name)
        if name not in produced:  # an output that is an outer value: a branch must produce its outputs
            nodes.append(helper.make_node("Identity", [name], [f"{prefix}{output.name}/out"]))
            name = f"{prefix}{output.name}/out"
        value = onnx.ValueInfoProto()
        value.CopyFrom(output)
        value.name = name
        value.type.tensor_type.ClearField("shape")  # the two branches differ in sequence lengths
        outputs.append(value)
    return helper.make_graph(nodes, f"{prefix.rstrip('/')}_branch", [], outputs)


def merge_decoders(first: onnx.ModelProto, cached: onnx.ModelProto) -> onnx.ModelProto:
    """One model taking the inputs of both graphs plus ``use_cache_branch`` (bool ``[1]``)."""
    first_outputs = [o.name for o in first.graph.output]
    cached_outputs = [o.name for o in cached.graph.output]
    if first_outputs != cached_outputs:
        raise ValueError(f"decoder graphs disagree on outputs: {first_outputs} vs {cached_outputs}")
    # The cached step may not read encoder_hidden_states (its cross-attention keys/values are cached); the
    # merged graph still declares it, as transformers.js feeds it on every step.
    first_names = {i.name for i in first.graph.input}
    inputs = [*first.graph.input, *(i for i in cached.graph.input if i.name not in first_names)]
    outer_inputs = {i.name for i in inputs}

    initializers: dict[str, onnx.TensorProto] = {}  # content key -> tensor (named once)
    renames: list[dict[str, str]] = []
    for index, model in enumerate((first, cached)):
        hoist_constants(model)
        mapping = {}
        for tensor in model.graph.initializer:
            key = _content_key(tensor)
            if key not in initializers:
                kept = onnx.TensorProto()
                kept.CopyFrom(tensor)
                taken = {t.name for t in initializers.values()}
                kept.name = tensor.name if tensor.name not in taken else f"{tensor.name}__{index}"
                initializers[key] = kept
            mapping[tensor.name] = initializers[key].name
        renames.append(mapping)

    then_branch = _branch(cached, "cached/", renames[1], outer_inputs)
    else_branch = _branch(first, "first/", renames[0], outer_inputs)
    if_node = helper.make_node(
        "If",
        [FLAG],
        cached_outputs,
        name="use_cache_branch_if",
        then_branch=then_branch,
        else_branch=else_branch,
    )
    flag = helper.make_tensor_value_info(FLAG, TensorProto.BOOL, [1])
    graph = helper.make_graph(
        [if_node],
        "decoder_model_merged",
        [*inputs, flag],
        list(cached.graph.output),
        initializer=list(initializers.values()),
    )
    merged = helper.make_model(graph, opset_imports=cached.opset_import, producer_name="tinymusician")
    merged.ir_version = cached.ir_version
    return merged
