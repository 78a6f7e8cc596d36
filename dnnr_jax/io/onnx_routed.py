"""One ONNX graph that runs an early-exit model's expensive stage on the routed rows only.

jax2onnx traces static or symbolic shapes, so it cannot write a graph whose
row count depends on the routes. The two stages are therefore exported
separately (each a plain jax2onnx graph over a symbolic batch) and composed
here with the `onnx` helpers:

    input -> cheap stage -> exit_logits [B, C], deep_path bool [B] (, hidden)
    logits = If(ReduceSum(Cast(deep_path)) > 0,
                then: routed = Transpose(NonZero(deep_path))   # [K, 1], K routed rows
                      ScatterND(exit_logits, routed,
                                expensive(Gather(hidden, routed rows))),
                else: exit_logits)

A batch with no routed row runs no expensive node; at batch 1 the graph is
an `If` between the exit's answer and the expensive stage. The expensive
stage's names are prefixed with 'deep/' and its initializers stay in its
branch.
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
      helper.make_node('Squeeze', ['routed_rows', 'routed_axis'], ['routed_index'],
                       name='routed_index'),
      helper.make_node('Gather', [hidden, 'routed_index'], [stage_input], axis=0,
                       name='gather_routed'),
      *stage.graph.node,
      helper.make_node('ScatterND', ['exit_logits', 'routed_rows', stage_output],
                       ['routed_logits'], name='scatter_routed'),
  ]
  then_graph = helper.make_graph(
      then_nodes, 'expensive_stage', inputs=[],
      outputs=[helper.make_tensor_value_info('routed_logits', TensorProto.FLOAT, None)],
      initializer=[*stage.graph.initializer,
                   helper.make_tensor('routed_axis', TensorProto.INT64, [1], [1])])
  else_graph = helper.make_graph(
      [helper.make_node('Identity', ['exit_logits'], ['exit_only'], name='exit_only')],
      'exit_only', inputs=[],
      outputs=[helper.make_tensor_value_info('exit_only', TensorProto.FLOAT, None)])
  graph = cheap.graph
  kept_outputs = [output for output in graph.output if output.name != hidden]
  routing_nodes = [
      helper.make_node('Cast', ['deep_path'], ['deep_path_int'], to=TensorProto.INT64,
                       name='deep_path_int'),
      helper.make_node('ReduceSum', ['deep_path_int'], ['routed_count'], keepdims=0,
                       name='routed_count'),
      helper.make_node('Greater', ['routed_count', 'no_rows'], ['any_routed'],
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
      initializer=[*graph.initializer, helper.make_tensor('no_rows', TensorProto.INT64, [], [0])])
  model = helper.make_model(composed, opset_imports=list(cheap.opset_import),
                            producer_name=cheap.producer_name)
  model.ir_version = cheap.ir_version
  model.functions.extend([*cheap.functions, *stage.functions])
  return model
