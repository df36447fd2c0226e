from lte_convert.errors import UserError, format_error


def test_wrap_never_breaks_a_command_or_a_path():
    path = "/tmp/" + "a-very-long-folder-name-" * 6 + "/relu.onnx"
    text = format_error(UserError(f"{path} was not produced by lte-convert; export it with "
                                  f"`lte-convert export CKPT --out model.onnx` first."), width=60)
    lines = text.splitlines()
    assert len(lines) > 2 and text.startswith("error:")
    assert path in lines, lines                      # the path whole, on a line of its own
    assert "lte-convert" in text and "lte- convert" not in " ".join(lines)
    assert all(len(line) <= 60 for line in lines if path not in line)
