"""Top-k counts and the Markdown results table."""
import torch

from imagenet_ffcv.metrics import format_table, topk_correct

# 3 samples, 6 classes.
#   sample 0: target 1 has the highest logit            -> top-1 hit
#   sample 1: logits 5..0, target 4 is 5th highest       -> top-5 hit only
#   sample 2: logits 0..5, target 0 is the lowest (6th)  -> neither
LOGITS = torch.tensor([[0.1, 0.9, 0.3, 0.2, 0.0, 0.5],
                       [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
                       [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
TARGET = torch.tensor([1, 4, 0])


def test_topk_correct_top1_top5():
    """Default ks=(1, 5): 1 top-1 hit, 2 top-5 hits."""
    assert topk_correct(LOGITS, TARGET).tolist() == [1, 2]


def test_topk_correct_each_k():
    """k=1..6: the hits at ranks 1, 5 and 6 give 1, 1, 1, 1, 2, 3."""
    assert topk_correct(LOGITS, TARGET, ks=(1, 2, 3, 4, 5, 6)).tolist() == [1, 1, 1, 1, 2, 3]


def test_topk_correct_k_larger_than_classes_counts_all():
    """k=10 > 6 classes counts every sample; the other k are unaffected."""
    assert topk_correct(LOGITS, TARGET, ks=(1, 10)).tolist() == [1, 3]
    assert topk_correct(LOGITS[:, :3], torch.tensor([2, 0, 1]), ks=(5,)).tolist() == [3]


def test_topk_correct_counts_on_the_logits_device():
    """The counts are an int64 tensor on the logits' device (validation sums them there and reads
    the sums once, rather than waiting for the GPU at every batch)."""
    out = topk_correct(LOGITS.to(torch.float64), TARGET)
    assert (out.dtype, out.shape, out.device) == (torch.int64, (2,), LOGITS.device)


def test_topk_correct_all_wrong_and_all_right():
    """A target never in the top-1 gives 0; argmax targets give N."""
    logits = torch.eye(4)
    assert topk_correct(logits, torch.tensor([1, 2, 3, 0]), ks=(1,)).tolist() == [0]
    assert topk_correct(logits, torch.tensor([0, 1, 2, 3]), ks=(1,)).tolist() == [4]


def test_format_table_exact():
    """Header, separator and row, columns padded to the widest cell."""
    table = format_table([['resnet50', 16, '71.43 %']], ['arch', 'epochs', 'top-1'])
    assert table == ('| arch     | epochs | top-1   |\n'
                     '|----------|--------|---------|\n'
                     '| resnet50 | 16     | 71.43 % |')


def test_format_table_lines_equal_length():
    """Every line of a multi-row table has the same length; separator is dashes between pipes."""
    table = format_table([['resnet18', 88, '71.40 %', '12345 s'], ['resnet50', 8, '1 %', '3 s']],
                         ['arch', 'epochs', 'top-1', 'wall time'])
    lines = table.split('\n')
    assert len(lines) == 4
    assert len({len(line) for line in lines}) == 1
    assert lines[0].startswith('| arch ') and lines[0].endswith(' |')
    assert set(lines[1]) == {'|', '-'}
    assert lines[1].count('|') == 5
    assert lines[3].split('|')[1:-1] == [' resnet50 ', ' 8      ', ' 1 %     ', ' 3 s       ']


def test_progress_png_that_cannot_be_written_is_named_and_the_last_one_kept(tmp_path,
                                                                             monkeypatch):
    """A full disk as progress.png is drawn: the trainer's one line said '[Errno 28] No space
    left on device' alone, naming no file; the previous plot stays whole."""
    import errno
    import json
    import matplotlib.figure
    import pytest
    from imagenet_ffcv.metrics import plot_log
    log, png = tmp_path / 'log.jsonl', tmp_path / 'progress.png'
    log.write_text(json.dumps({'epoch': 0, 'train_loss': 2.0, 'top_1': 0.1, 'lr': 0.1,
                               'res': 160}) + '\n')
    plot_log(log, png)
    before = png.read_bytes()

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', full_disk)
    with pytest.raises(OSError) as info:
        plot_log(log, png)
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(png))
    assert png.read_bytes() == before and sorted(tmp_path.iterdir()) == [log, png]
