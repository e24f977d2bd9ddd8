"""spinfx.testing as a user meets it: a test file of their own, run by pytest with the plugin."""
import textwrap

USER_TEST = textwrap.dedent('''
    import torch
    import spinfx
    from spinfx.testing import graph_text


    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.proj(x)) {extra}


    def test_block_graph(spinfx_golden):
        prog = spinfx.trace(Block(), example_inputs=(torch.randn(2, 4),))
        spinfx_golden(graph_text(prog), """
        """)
''')


def _write(pytester, extra=""):
    return pytester.makepyfile(test_user=USER_TEST.replace("{extra}", extra))


def test_accept_then_pass_then_diff_on_change(pytester, monkeypatch):
    path = _write(pytester)
    # 1. empty golden: fails with a diff that shows the actual graph
    res = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    res.assert_outcomes(failed=1)
    out = res.stdout.str()
    assert "golden mismatch at test_user.py" in out and "SPINFX_ACCEPT=1" in out
    assert "+v0 = aten.linear(in0, $proj.weight, $proj.bias) : f32[2,4]" in out
    # 2. accept: the string in the user's file is rewritten
    monkeypatch.setenv("SPINFX_ACCEPT", "1")
    pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider").assert_outcomes(passed=1)
    text = path.read_text()
    assert "v1 = aten.relu(v0) : f32[2,4]" in text
    # 3. accepted golden passes without the switch
    monkeypatch.delenv("SPINFX_ACCEPT")
    pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider").assert_outcomes(passed=1)
    # 4. the model changes (an extra op): readable failure diff naming the new node
    golden = text[text.index('"""'):]
    path.write_text(USER_TEST.replace("{extra}", "* 2.0").split("spinfx_golden(graph_text(prog), ")[0]
                    + "spinfx_golden(graph_text(prog), " + golden)
    res = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    res.assert_outcomes(failed=1)
    out = res.stdout.str()
    assert "-return [v1]" in out and "+v2 = aten.mul.Tensor(v1, 2.0) : f32[2,4]" in out
