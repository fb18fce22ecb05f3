"""Top-k counts and the end-of-run results table."""
import torch


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list:
    """Number of samples whose target is among the ``k`` highest logits, for each ``k``.

    logits: (N, C) float; target: (N,) int64 class indices. ``k`` larger than C counts every
    sample. Returns a list of ints, one per ``k``.
    """
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices               # (N, maxk)
    hits = top.eq(target.view(-1, 1))                     # (N, maxk) bool
    return [int(hits[:, :min(k, maxk)].any(dim=1).sum()) for k in ks]


def format_table(rows: list, headers: list) -> str:
    """A Markdown table: ``headers`` a list of str, ``rows`` a list of lists of values."""
    cells = [[str(h) for h in headers]] + [[str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ['| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + ' |' for r in cells]
    lines.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    return '\n'.join(lines)


def with_error_rates(result: dict) -> dict:
    """Add ``top_1_err = 1 - top_1`` and ``top_5_err = 1 - top_5`` (fractions) to an evaluation
    result, the error rates older ImageNet tools report. Returns a new dict."""
    return {**result, 'top_1_err': 1 - result['top_1'], 'top_5_err': 1 - result['top_5']}


def results_table(summary: dict) -> str:
    """The end-of-run table (Markdown): arch, epochs, top-1/top-5 accuracy and error (%), wall time,
    train img/s; a second row for 10-crop results and a last line for a top-1 target when present."""
    pct = lambda x: f'{100 * x:.2f} %'  # noqa: E731
    headers = ['arch', 'eval', 'epochs', 'top-1', 'top-5', 'top-1 err', 'top-5 err', 'wall time',
               'train img/s']
    rows = [[summary['arch'], 'centre' + (' + flip' if summary.get('flip_tta', True) else ''),
             summary['epochs'], pct(summary['top_1']), pct(summary['top_5']),
             pct(summary['top_1_err']), pct(summary['top_5_err']),
             f'{summary["wall_time_s"]:.0f} s', f'{summary["train_img_per_s"]:.0f}']]
    if 'top_1_10crop' in summary:
        rows.append([summary['arch'], '10-crop', summary['epochs'], pct(summary['top_1_10crop']),
                     pct(summary['top_5_10crop']), pct(summary['top_1_err_10crop']),
                     pct(summary['top_5_err_10crop']), '', ''])
    table = format_table(rows, headers)
    if summary.get('target_top1'):
        if summary.get('target_reached_epoch') is not None:
            table += (f'\ntarget top-1 {pct(summary["target_top1"])} reached at epoch '
                      f'{summary["target_reached_epoch"]}: time to accuracy '
                      f'{summary["time_to_target_s"]:.0f} s')
        else:
            table += f'\ntarget top-1 {pct(summary["target_top1"])} not reached'
    return table
