"""torch.ops.lte.sparse_ffn through torch.export and the ONNX translation table: the op stays
one op in a torch.export program (which computes what eager does), and the ONNX exporter turns
it into the node pair with the inputs and attributes plugins/spec.py defines."""
import onnx
import pytest
import torch
from onnx import numpy_helper

from lte_convert.exporters.symbolic import onnx_schemas, translation_table
from lte_convert.plugins import ops, spec

D, F, S = 8, 16, 4


class _FFN(torch.nn.Module):
    def __init__(self, gated, biases):
        super().__init__()
        self.shape = spec.FFNShape(d=D, d_ff=F, expert_size=S, activation="gelu_tanh", gated=gated)
        self.router = torch.nn.Linear(D, F // S)
        p = lambda *s: torch.nn.Parameter(torch.randn(*s))
        self.w_gate = p(F, D) if gated else None
        self.w_up, self.w_down_t = p(F, D), p(F, D)
        self.b_gate = p(F) if gated and biases else None
        self.b_up = p(F) if biases else None
        self.b_down = p(D) if biases else None

    def forward(self, x):
        return ops.sparse_ffn(x, self.router(x) > 0, self.w_gate, self.w_up, self.w_down_t,
                              self.b_gate, self.b_up, self.b_down, self.shape)


def _export(module):
    with onnx_schemas():
        prog = torch.onnx.export(module, (torch.randn(2, 3, D),), dynamo=True, verbose=False,
                                 dynamic_shapes=({0: "batch", 1: "seq"},),
                                 custom_translation_table=translation_table())
    assert not onnx.defs.has(spec.OP_UP, spec.NAMESPACE)      # registered for the export only
    return prog.model_proto


@pytest.mark.parametrize("gated,biases", [(True, False), (False, True)])
def test_node_pair(gated, biases):
    m = _export(_FFN(gated, biases))
    nodes = [n for n in m.graph.node if n.domain == spec.NAMESPACE]
    assert [n.op_type for n in nodes] == [spec.OP_UP, spec.OP_DOWN]
    up, down = nodes
    attrs = lambda n: {a.name: (a.s.decode() if a.type == a.STRING else a.i) for a in n.attribute}
    assert attrs(up) == {"expert_size": S, "activation": "gelu_tanh", "gated": int(gated),
                         "plugin_namespace": "lte"}
    assert attrs(down) == {"expert_size": S, "plugin_namespace": "lte"}
    assert len(up.input) == len(spec.UP_INPUTS) and len(down.input) == len(spec.DOWN_INPUTS)
    assert up.input[1] == down.input[1]                       # one mask feeds both
    assert down.input[0] == up.output[0]
    mask_producer = next(n for n in m.graph.node if up.input[1] in n.output)
    assert mask_producer.op_type == "Greater"
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    w_gate, w_up, b_gate, b_up = (up.input[2], up.input[3], up.input[4], up.input[5])
    assert inits[w_up].shape == (F, D) and inits[down.input[2]].shape == (F, D)
    if gated:
        assert w_gate != w_up and (inits[b_gate] == 0).all() and (inits[b_up] == 0).all()
        assert (inits[down.input[3]] == 0).all() and inits[down.input[3]].shape == (D,)
    else:                                                     # W_up/b_up again in gate slots
        assert (w_gate, b_gate) == (w_up, b_up)
        assert not (inits[b_up] == 0).all()


def test_torch_export_of_a_folded_model_equals_eager():
    """A folded LTE Llama through torch.export: lte.sparse_ffn stays in the program, once per
    LTE FFN, and the program's logits are eager PyTorch's."""
    from lte_convert.converter.checkpoint import load_lte_model
    from tests.exporters.conftest import tiny_checkpoint
    from tiny_models import random_ids

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_lte_model(tiny_checkpoint("llama", f"{tmp}/ckpt"))
    ids = random_ids(2, 7)

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits

    with torch.no_grad():
        program = torch.export.export(Logits().eval(), (ids,))
        assert str(program.graph).count("lte.sparse_ffn") == model.config.num_hidden_layers
        torch.testing.assert_close(program.module()(ids), Logits().eval()(ids), rtol=0, atol=0)
