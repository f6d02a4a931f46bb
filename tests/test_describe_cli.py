import describe


def test_list_names_every_variant(capsys):
    from deeplab_tf import VARIANTS

    assert describe.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == list(VARIANTS)


def test_describe_reports_output_size(capsys):
    args = ["--variant", "deeplabv3-mobilenetv2", "--num-classes", "5", "--input-size", "97", "65"]
    assert describe.main(args) == 0
    assert "input 97x65 -> logits 7x5x5 at output stride 16" in capsys.readouterr().out


def test_unknown_variant_is_one_line_and_exit_2(capsys):
    assert describe.main(["--variant", "deeplabv9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown variant 'deeplabv9'" in err


def test_describe_says_a_decoder_puts_the_logits_at_stride_4(capsys):
    args = ["--variant", "deeplabv3plus-resnet10-cpu", "--num-classes", "3", "--input-size", "97"]
    assert describe.main(args) == 0
    out = capsys.readouterr().out
    assert "input 97x97 -> logits 25x25x3 at stride 4 (decoder; encoder at output stride 8)" in out
