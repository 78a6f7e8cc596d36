"""One ONNX graph that runs an early-exit model's expensive stage on the routed rows only.

jax2onnx traces static or symbolic shapes, so it cannot write a graph whose
row count depends on the routes. The two stages are therefore exported
separately (each a plain jax2onnx graph over a symbolic batch) and composed
here with the `onnx` helpers:

    input -> cheap stage -> exit_logits [B, C], deep_path bool [B] (, hidden)
    logits = If(ReduceMax(deep_path),                  # any row routed
                then: routed = Transpose(NonZero(deep_path))   # [K, 1], K routed rows
                      ScatterND(exit_logits, routed,
                                expensive(GatherND(hidden, routed))),
                else: Identity(exit_logits))

A batch with no routed row runs no expensive node; at batch 1 the graph is
an `If` between the exit's answer and the expensive stage. The expensive
stage's names are prefixed with 'deep/' and its initializers stay in its
branch.

At small batches the graph's cost is per node, not arithmetic (a batch-1
easy input spends about as long in the routing nodes as in the exit's two
`Gemm`s), so the routing takes as few nodes as the operators allow: the
`If` condition is one boolean `ReduceMax` (opset 20), and the routed rows'
`[K, 1]` indices serve both `GatherND` and `ScatterND`. A boolean
`ReduceMax` is undefined on an empty set, so the graph takes batches of at
least one row (as the JAX model does).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, compose, helper

PREFIX = 'deep/'


def compose_routed(cheap: onnx.ModelProto, expensive: onnx.ModelProto, *,
                   hidden: str) -> onnx.ModelProto:
  """The per-sample routed graph of two stage graphs.

  Args:
    cheap: input 'input' -> outputs 'exit_logits' [B, C] and 'deep_path'
      bool [B] (and `hidden` when it is not the input).
    expensive: one input [N, H] -> one output 'logits' [N, C].
    hidden: the cheap graph's value that feeds the expensive stage: 'input'
      when the exit reads the input, else an output of `cheap`.

  Returns:
    A model with input 'input' and outputs 'logits', 'deep_path'.
  """
  if len(expensive.graph.input) != 1 or [o.name for o in expensive.graph.output] != ['logits']:
    raise ValueError('the expensive stage must map one input to one output named logits')
  stage = compose.add_prefix(expensive, PREFIX)
  stage_input = stage.graph.input[0].name
  stage_output = stage.graph.output[0].name
  then_nodes = [
      helper.make_node('NonZero', ['deep_path'], ['routed_positions'], name='routed_positions'),
      helper.make_node('Transpose', ['routed_positions'], ['routed_rows'], perm=[1, 0],
                       name='routed_rows'),
      helper.make_node('GatherND', [hidden, 'routed_rows'], [stage_input],
                       name='gather_routed'),
      *stage.graph.node,
      helper.make_node('ScatterND', ['exit_logits', 'routed_rows', stage_output],
                       ['routed_logits'], name='scatter_routed'),
  ]
  then_graph = helper.make_graph(
      then_nodes, 'expensive_stage', inputs=[],
      outputs=[helper.make_tensor_value_info('routed_logits', TensorProto.FLOAT, None)],
      initializer=list(stage.graph.initializer))
  else_graph = helper.make_graph(
      [helper.make_node('Identity', ['exit_logits'], ['exit_only'], name='exit_only')],
      'exit_only', inputs=[],
      outputs=[helper.make_tensor_value_info('exit_only', TensorProto.FLOAT, None)])
  graph = cheap.graph
  kept_outputs = [output for output in graph.output if output.name != hidden]
  routing_nodes = [
      helper.make_node('ReduceMax', ['deep_path'], ['any_routed'], keepdims=0,
                       name='any_routed'),
      helper.make_node('If', ['any_routed'], ['logits'], then_branch=then_graph,
                       else_branch=else_graph, name='run_expensive_stage'),
  ]
  logits = onnx.ValueInfoProto()
  logits.CopyFrom(next(output for output in kept_outputs if output.name == 'exit_logits'))
  logits.name = 'logits'
  outputs = [logits, *[output for output in kept_outputs if output.name == 'deep_path']]
  composed = helper.make_graph(
      [*graph.node, *routing_nodes], graph.name, inputs=list(graph.input), outputs=outputs,
      initializer=list(graph.initializer))
  model = helper.make_model(composed, opset_imports=list(cheap.opset_import),
                            producer_name=cheap.producer_name)
  model.ir_version = cheap.ir_version
  model.functions.extend([*cheap.functions, *stage.functions])
  return model
