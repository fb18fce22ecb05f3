"""The one atomic-write helper and the one PID-aware clean-up of temporaries (imagenet_ffcv/files.py),
and the run folder that uses them (imagenet_ffcv/run_dir.py)."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, dead_pid
from imagenet_ffcv import files, run_lock
from imagenet_ffcv.files import boot_id, pid_namespace, process_start
from imagenet_ffcv.run_dir import RunDir, RunLogError, code_version, latest_checkpoint
from imagenet_ffcv.run_lock import RunLockedError, lock_identity


def test_a_file_written_through_atomic_path_is_on_disk_before_it_takes_the_name(tmp_path,
                                                                                monkeypatch):
    """``atomic_path`` (the .beton's way, through a library that takes a file name) flushes the
    written temporary to disk before renaming it: fsync on the temporary, then the rename."""
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, 'fsync', lambda fd: events.append(
        ('fsync', os.readlink(f'/proc/self/fd/{fd}'))) or fsync(fd))
    monkeypatch.setattr(os, 'replace', lambda a, b: events.append(('replace', str(a))) or
                        replace(a, b))
    target = tmp_path / 'data.beton'
    with files.atomic_path(target) as tmp:
        tmp.write_bytes(b'x' * 100)
    assert events == [('fsync', str(tmp)), ('replace', str(tmp))]
    assert target.read_bytes() == b'x' * 100


def test_atomic_write_replaces_whole_or_keeps_the_previous_file(tmp_path):
    path = tmp_path / 'params.json'
    files.write_text_atomic(path, 'first')
    files.write_text_atomic(path, 'second')
    assert path.read_text() == 'second'
    with pytest.raises(RuntimeError):
        with files.atomic_write(path) as f:
            f.write('half of a third')
            raise RuntimeError('crash while writing')
    assert path.read_text() == 'second'
    assert [p.name for p in tmp_path.iterdir()] == ['params.json']  # no temporary left


def test_files_written_atomically_have_the_permissions_of_a_new_file(tmp_path):
    """A file that a library creates private (safetensors: mode 0600) through atomic_path gets
    the mode ``open`` gives a new file under the umask: final_weights.safetensors was 0600, so a
    colleague sharing the run folder could read final_weights.pt but not it."""
    import torch
    from imagenet_ffcv.weights import save_final_weights
    previous = os.umask(0o027)
    try:
        assert files.umask() == 0o027
        save_final_weights({'w': torch.ones(2)}, tmp_path / 'final_weights.pt')
        with files.atomic_path(tmp_path / 'private') as tmp:
            os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {'final_weights.pt': 0o640, 'final_weights.safetensors': 0o640,
                     'private': 0o640}


def test_a_run_killed_while_its_final_weights_are_written_is_not_finished(tmp_path, monkeypatch):
    """final_weights.pt marks a run finished; it was written before final_weights.safetensors,
    so a kill, SIGTERM or full disk between the two left a run 'finished' without its
    .safetensors for ever. The .safetensors is written first: a failure in it leaves no
    final_weights.pt, and --resume writes both."""
    import safetensors
    import safetensors.torch
    import torch
    from imagenet_ffcv.weights import save_final_weights
    run = RunDir.create(tmp_path, params={})

    def full_disk(*args, **kwargs):  # what safetensors raises then (not an OSError)
        raise safetensors.SafetensorError('Error while serializing: I/O error: No space left on '
                                          'device (os error 28)')
    monkeypatch.setattr(safetensors.torch, 'save_file', full_disk)
    with pytest.raises(OSError, match=r'cannot write the weights \(Error while serializing: I/O '
                                      r'error: No space left') as info:
        save_final_weights({'w': torch.ones(2)}, run.final_weights)
    assert info.value.filename == str(run.final_safetensors)  # train's one line names it
    assert not run.is_finished and not run.final_safetensors.exists()
    monkeypatch.undo()
    save_final_weights({'w': torch.ones(2)}, run.final_weights)
    assert run.is_finished and run.final_safetensors.exists()


def test_a_filesystem_that_refuses_chmod_still_gets_the_file(tmp_path, monkeypatch):
    """Some mounts refuse a chmod (CIFS with another owner: EPERM; FUSE: ENOSYS): the file is
    written all the same, with the mode it was created with."""
    def refuse(*args):
        raise PermissionError(1, 'Operation not permitted')
    monkeypatch.setattr(os, 'chmod', refuse)
    files.write_text_atomic(tmp_path / 'params.json', '{}')
    assert (tmp_path / 'params.json').read_text() == '{}'


def test_atomic_path_renames_only_on_success(tmp_path):
    path = tmp_path / 'train.beton'
    with files.atomic_path(path) as tmp:
        assert tmp.name == f'.train.beton.partial-{files.host_name()}-{os.getpid()}'
        tmp.write_bytes(b'complete')
    assert path.read_bytes() == b'complete'
    with pytest.raises(ValueError):
        with files.atomic_path(path) as tmp:
            tmp.write_bytes(b'partial')
            raise ValueError
    assert path.read_bytes() == b'complete' and len(list(tmp_path.iterdir())) == 1


def test_text_files_are_written_as_utf8_whatever_the_locale(tmp_path):
    """Class lists (read as UTF-8), skipped-file reports and predict's CSV hold names that are not
    ASCII: under an ASCII locale (LC_ALL=C without Python's UTF-8 mode) writing them failed."""
    env = dict(os.environ, LC_ALL='C', PYTHONUTF8='0', PYTHONCOERCECLOCALE='0')
    subprocess.run([sys.executable, '-c', 'import sys; from imagenet_ffcv import files; '
                    'files.write_text_atomic(sys.argv[1], '
                    '"n02085620\tChihuahua \\u00e0 caf\\u00e9")',  # escapes: argv is ASCII there
                    str(tmp_path / 'x.tsv')], cwd=REPO, env=env, check=True)
    assert (tmp_path / 'x.tsv').read_bytes() == 'n02085620\tChihuahua à café'.encode()


def test_stale_temporaries_of_dead_processes_go_and_those_of_live_ones_stay(tmp_path):
    dead, alive = dead_pid(), os.getppid()  # the parent of pytest runs for sure
    stale = [tmp_path / f'.checkpoint.pt.partial-{dead}', tmp_path / f'.x.beton.failures-{dead}']
    kept = [tmp_path / f'.checkpoint.pt.partial-{alive}', tmp_path / f'.mine.partial-{os.getpid()}',
            tmp_path / 'checkpoint.pt', tmp_path / '.partial-notapid']
    for p in stale + kept:
        p.write_text('')
    assert sorted(files.remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    # Limited to one file's temporaries:
    other = tmp_path / f'.other.partial-{dead}'
    other.write_text('')
    assert files.remove_stale_temporaries(tmp_path, 'checkpoint.pt') == []
    assert other.exists()
    # a name with glob's characters (train[1].beton) matched no temporary: a killed writer's
    # hidden .beton, of the data set's size, stayed for ever
    killed = tmp_path / f'.x[1].beton.partial-{dead}'
    killed.write_text('')
    assert files.remove_stale_temporaries(tmp_path, 'x[1].beton') == [killed]


def test_reopening_a_run_cuts_the_log_and_keeps_a_live_writers_temporary(tmp_path):
    """A resumed run deletes its killed start's temporaries, of this machine (its PID gone) and
    of another node (rank 0 moved there, SLURM's requeue): the run's lock is held, so none is a
    writer's (kept, a checkpoint-sized file stayed for ever). The claim of a job waiting for the
    lock on another node stays (deleted between its writing and linking, that job failed with
    ENOENT), a killed job's claim of this machine goes."""
    run = RunDir.create(tmp_path, params={'training': {'epochs': 3}})
    assert json.loads(run.params.read_text())['training']['epochs'] == 3
    for epoch in range(3):
        run.append_log({'epoch': epoch, 'top_1': epoch / 10})
    live = run.path / f'.checkpoint.pt.partial-{os.getppid()}'
    dead = run.path / f'.checkpoint.pt.partial-{dead_pid()}'
    elsewhere = run.path / f'.checkpoint.pt.partial-other-node-{os.getppid()}'
    waiting = run.path / f'.lock.0123456789ab.claim-other-node-{os.getppid()}'
    killed = run.path / f'.lock.ba9876543210.claim-{files.host_name()}-{dead_pid()}'
    for tmp in (live, dead, elsewhere, waiting, killed):
        tmp.write_text('')
    run.checkpoint.write_text('')
    again = RunDir.reopen(run.checkpoint, epoch=2)
    assert [r['epoch'] for r in again.read_log()] == [0, 1]
    assert live.exists() and not dead.exists() and not elsewhere.exists()
    assert waiting.exists() and not killed.exists()
    assert latest_checkpoint(tmp_path) == run.checkpoint
    run.final_weights.write_text('')
    assert run.is_finished and latest_checkpoint(tmp_path) == run.checkpoint  # finished or not


def test_a_run_folder_is_locked_by_its_job_and_a_dead_jobs_lock_is_taken_over(tmp_path,
                                                                             monkeypatch):
    """The lock names this process; a live process's lock, or one from another host, refuses
    the run (naming the holder) before anything in the folder changes; a dead process's lock is
    taken over; unlock removes this process's lock."""
    for name in ('SLURM_JOB_ID', 'SLURM_RESTART_COUNT', 'SLURM_STEP_ID', 'TORCHELASTIC_RUN_ID'):
        monkeypatch.delenv(name, raising=False)
    host = socket.gethostname()
    me = {'pid': os.getpid(), 'host': host, 'heartbeat_s': run_lock.HEARTBEAT_S, 'boot': boot_id(),
          'pid_ns': pid_namespace(),
          'started': process_start(os.getpid()), 'job': None, 'start': 0, 'step': None,
          'rdzv': None}
    run = RunDir.create(tmp_path, params={'logging': {'run_name': 'a'}}, run_name='a')
    assert run.path.name.startswith('a-') and run.run_name == 'a'
    assert run.lock_holder() == me
    for epoch in range(3):
        run.append_log({'epoch': epoch})
    live = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'],
                            stdin=subprocess.PIPE)
    try:
        for holder in ({'pid': live.pid, 'host': host}, {'pid': 1, 'host': 'elsewhere'}):
            run.lock_file.write_text(json.dumps(holder))
            with pytest.raises(RunLockedError, match=f'PID {holder["pid"]} on {holder["host"]}'):
                RunDir.reopen(run.checkpoint, epoch=1)
            assert len(run.read_log()) == 3 and run.lock_holder() == holder  # untouched
    finally:
        live.communicate(b'')
    run.lock_file.write_text(json.dumps({'pid': dead_pid(), 'host': host}))
    again = RunDir.reopen(run.checkpoint, epoch=1)
    assert again.lock_holder() == me
    assert [r['epoch'] for r in again.read_log()] == [0]
    again.unlock()
    assert not again.lock_file.exists()
    # a lock that is not UTF-8 text (not this tool's): read as such, not a UnicodeDecodeError
    again.lock_file.write_bytes(b'\xff\xfe garbage')
    assert run_lock.read_lock(again.lock_file) == {'pid': '?', 'host': '?'}
    with pytest.raises(RunLockedError, match=r'PID \? on \?'):
        RunDir.reopen(run.checkpoint, epoch=1)


@pytest.mark.skipif(process_start(os.getpid()) is None, reason='needs Linux /proc')
def test_a_lock_whose_pid_another_process_took_or_from_before_a_reboot_is_taken_over(
        tmp_path, monkeypatch, capsys):
    """A job killed on this host whose PID another process took since (a reboot gives low PIDs
    again at once) was refused for ever, its PID alive. The lock's start time (clock ticks since
    boot, which clock steps do not move) tells the two apart, and a lock from before the
    machine's restart (another boot id, in any container) is taken over (one with a heartbeat once
    it is stale: another machine of this host name reads the same). The live holder itself is
    refused. A lock of another PID namespace (a container of this host name) is judged by its
    heartbeat: one refreshed is refused, whatever its PID (two containers with the host's network
    run the trainer as the same PID); an older version's, without heartbeat_s, by its PID alone:
    taken over when that PID runs no process here or is this process's, else refused."""
    run = RunDir.create(tmp_path, params={}, run_name='a')
    live = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'],
                            stdin=subprocess.PIPE)
    try:
        holder = {**lock_identity(), 'pid': live.pid, 'started': process_start(live.pid)}
        other_ns = {**holder, 'pid_ns': 'pid:[1]', 'started': 1, 'heartbeat_s': 0.1}
        beating = {**other_ns, 'pid': os.getpid()}  # a live container's, with this PID
        monkeypatch.setattr(run_lock, 'STALE_BEATS', 300)  # its refresh is seen long before
        alive = run_lock.Heartbeat(run.lock_file, beating)
        other_ns.pop('heartbeat_s')  # an older version's: its PID alone tells (a live one here)
        for refused in (holder, other_ns, beating):
            run.lock_file.write_text(json.dumps(refused))
            if refused is beating:
                alive.start()
            with pytest.raises(RunLockedError, match='give this job its own run name'):
                RunDir.reopen(run.checkpoint, epoch=0)
        alive.stop()
        monkeypatch.setattr(run_lock, 'STALE_BEATS', 5)
        older = {k: v for k, v in holder.items() if k != 'heartbeat_s'}  # an older version's
        for ended, why in (({**holder, 'started': holder['started'] - 1},
                            f'PID {live.pid} is now another process'),
                           ({**older, 'boot': 'another'}, 'this machine has restarted since'),
                           ({**beating, 'boot': 'another'}, 'its lock was last refreshed'),
                           ({**other_ns, 'pid': dead_pid()}, 'it no longer runs'),
                           ({**other_ns, 'pid': os.getpid()}, f'PID {os.getpid()} is now this '
                                                                'process')):
            run.lock_file.write_text(json.dumps(ended))
            RunDir.reopen(run.checkpoint, epoch=0)
            assert f'taking over the lock of PID {ended["pid"]} on {holder["host"]}: {why}' in \
                capsys.readouterr().out
            assert run.lock_holder() == lock_identity()
    finally:
        live.communicate(b'')


def test_a_lock_that_cannot_be_checked_is_taken_over_once_its_job_stops_refreshing_it(
        tmp_path, monkeypatch, capsys):
    """A job's lock on another host outside SLURM (a Kubernetes Job's next pod, a resume on
    another machine after a crash) was refused for ever: nothing here could tell whether its job
    ran. A job refreshes its lock's time while it runs; a lock not refreshed for STALE_BEATS
    periods is taken over (waiting for that when needed), one refreshed is refused, and one
    without heartbeat_s (another tool's, an older version's) is refused at once, as before."""
    monkeypatch.setattr(run_lock, 'HEARTBEAT_S', 0.1)
    run = RunDir.create(tmp_path, params={}, run_name='a')
    first, waited = run_lock._mtime(run.lock_file), time.monotonic()
    while run_lock._mtime(run.lock_file) == first and time.monotonic() - waited < 30:
        time.sleep(0.05)
    assert run_lock._mtime(run.lock_file) > first  # this job's heartbeat
    run.unlock()
    run._heartbeat.join(30)
    assert not run._heartbeat.is_alive() and not run.lock_file.exists()
    elsewhere = {'pid': 1, 'host': 'node-17', 'heartbeat_s': 0.1}
    run.lock_file.write_text(json.dumps(elsewhere))
    os.utime(run.lock_file, (time.time() - 60, time.time() - 60))  # its job died a minute ago
    RunDir.reopen(run.checkpoint, epoch=0)
    assert 'taking over the lock of PID 1 on node-17: its lock was last refreshed 60 s ago' in \
        capsys.readouterr().out
    run.unlock()
    run.lock_file.write_text(json.dumps(elsewhere))  # died just now: taken over after 0.5 s
    started = time.monotonic()
    RunDir.reopen(run.checkpoint, epoch=0)
    assert 0.4 < time.monotonic() - started < 60  # 5 periods of 0.1 s, by the file's clock
    out = capsys.readouterr().out
    assert 'cannot be checked from here; waiting up to' in out and 'taking over' in out
    run.unlock()
    run.lock_file.write_text(json.dumps(elsewhere))
    alive = run_lock.Heartbeat(run.lock_file, elsewhere)  # its job runs, on node-17
    alive.start()
    monkeypatch.setattr(run_lock, 'STALE_BEATS', 300)  # its refresh is seen long before
    try:
        with pytest.raises(RunLockedError, match=r'PID 1 on node-17, .*lock\); give this job its '
                                                 r'own run name, or wait for that one to end$'):
            RunDir.reopen(run.checkpoint, epoch=0)
    finally:
        alive.stop()
    assert run.lock_holder() == elsewhere


def test_a_checkpoint_written_while_the_lock_was_awaited_stops_the_resume_untouched(tmp_path):
    """A job that loaded a run's checkpoint and then waited for its lock (up to STALE_BEATS
    periods) took it over once the other job had ended, and went on from the older state it had
    loaded: the log cut back, a finished run's final weights set aside. It now stops, nothing
    touched, the lock given back."""
    run = RunDir.create(tmp_path, params={}, run_name='a')
    run.checkpoint.write_text('epoch 1')
    run.append_log({'epoch': 0})
    run.append_log({'epoch': 1})
    run.unlock()
    loaded = run.checkpoint.stat().st_mtime_ns
    os.utime(run.checkpoint, ns=(loaded + 10**9, loaded + 10**9))  # the other job wrote it again
    with pytest.raises(RunLockedError, match='written again by another job since this one loaded'):
        RunDir.reopen(run.checkpoint, epoch=1, loaded_ns=loaded)
    assert len(run.read_log()) == 2 and not run.lock_file.exists()
    assert RunDir.reopen(run.checkpoint, epoch=1, loaded_ns=loaded + 10**9).read_log() == [
        {'epoch': 0}]


def test_a_log_cut_short_by_a_kill_or_a_full_disk_resumes(tmp_path):
    """log.jsonl's last line cut mid-record (a kill or a full disk during its append, before the
    epoch's checkpoint) stopped every resume with a JSONDecodeError traceback: it is left out
    (the resumed run logs that epoch again); a damaged line before the last is an error naming
    the file and the line."""
    run = RunDir.create(tmp_path, params={})
    for epoch in range(3):
        run.append_log({'epoch': epoch, 'top_1': 0.5})
    run.log.write_text(run.log.read_text()[:-12])
    assert [r['epoch'] for r in run.read_log()] == [0, 1]
    run.unlock()
    assert [r['epoch'] for r in RunDir.reopen(run.checkpoint, epoch=2).read_log()] == [0, 1]
    run.log.write_text('{"epoch": 0}\n{"epo\n{"epoch": 2}\n')
    with pytest.raises(RunLogError, match=r'log.jsonl: line 2 is not a JSON record'):
        run.read_log()


def test_a_run_whose_params_json_is_damaged_or_gone_is_still_found_by_its_name(tmp_path):
    """One run's params.json cut short stopped every --resume auto (and every new run) in the
    logging folder with a JSONDecodeError; one deleted made its run nameless, so --resume auto
    started over and a resume by path renamed it ''. The name is then read from the folder's."""
    runs = {name: RunDir.create(tmp_path, params={'logging': {'run_name': name}}, run_name=name)
            for name in ('a', 'b', '')}
    for run in runs.values():
        run.checkpoint.write_text('')
        run.unlock()
    runs['a'].params.write_text('{"logging": {"run_na')
    runs['b'].params.unlink()
    runs[''].params.write_text('[]')
    assert [latest_checkpoint(tmp_path, name) for name in ('a', 'b', '')] == [
        runs[name].checkpoint for name in ('a', 'b', '')]
    reopened = RunDir.reopen(runs['b'].checkpoint, epoch=0, params={'logging': {}})
    assert json.loads(reopened.params.read_text())['logging']['run_name'] == 'b'


def test_the_lock_of_a_requeued_slurm_jobs_earlier_start_is_taken_over_on_any_host(
        tmp_path, monkeypatch, capsys):
    """A SLURM job killed without unlocking (SIGKILL, a lost node) and requeued onto another node
    (same cluster and SLURM_JOB_ID, a higher SLURM_RESTART_COUNT) takes over its own earlier
    lock: each such start was refused, for ever, until someone deleted the lock. The same start
    of the same job elsewhere (a second training in one allocation), another job or cluster, a
    lock without a job, and a live process on this host (whatever its job) are refused; an empty
    lock (a power cut) is taken over. A torchrun restart within the same start and srun step
    (the same --rdzv-id) takes over its earlier rank 0's lock on another node; it was refused
    until torchrun's restarts ran out. Another step of the same allocation is refused."""
    for name in ('SLURM_JOB_ID', 'SLURM_CLUSTER_NAME', 'SLURM_RESTART_COUNT', 'SLURM_STEP_ID',
                 'TORCHELASTIC_RUN_ID'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('SLURM_JOB_ID', '4242')
    monkeypatch.setenv('SLURM_CLUSTER_NAME', 'c1')
    monkeypatch.setenv('SLURM_RESTART_COUNT', '1')
    run = RunDir.create(tmp_path, params={}, run_name='a')
    assert run.lock_holder() == {**lock_identity(), 'job': 'slurm:c1:4242', 'start': 1,
                                 'step': None, 'rdzv': None}

    def reopened(holder) -> bool:
        run.lock_file.write_text(json.dumps(holder))
        try:
            RunDir.reopen(run.checkpoint, epoch=0)
        except RunLockedError as e:
            assert f'PID {holder.get("pid")} on {holder.get("host")}' in str(e)
            return False
        assert run.lock_holder() == lock_identity()
        return True

    first = {'pid': 1, 'host': 'node-17', 'job': 'slurm:c1:4242', 'start': 0}
    assert reopened(first)
    assert 'taking over the lock of PID 1 on node-17: an earlier start of this job' in \
        capsys.readouterr().out
    assert not reopened({**first, 'start': 1})  # a second training of this start
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', '4242')  # --rdzv-id=$SLURM_JOB_ID
    monkeypatch.setenv('SLURM_STEP_ID', '0')  # the job script's first srun
    torchrun_start = {**first, 'start': 1, 'step': '0', 'rdzv': '4242'}
    assert reopened(torchrun_start)  # rank 0 of torchrun's last start
    assert ("taking over the lock of PID 1 on node-17: an earlier start of torchrun's workers "
            'in this step of the job (slurm:c1:4242, step 0, --rdzv-id 4242)') in \
        capsys.readouterr().out
    assert not reopened({**torchrun_start, 'step': '1'})  # another srun of the allocation
    assert not reopened({**torchrun_start, 'rdzv': '4243'})
    assert not reopened({**torchrun_start, 'rdzv': None})
    assert not reopened({**torchrun_start, 'job': 'slurm:c1:4241'})
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'none')  # torchrun's default: not told apart
    assert not reopened({**torchrun_start, 'rdzv': None})
    monkeypatch.delenv('TORCHELASTIC_RUN_ID')
    monkeypatch.delenv('SLURM_STEP_ID')
    assert not reopened({**first, 'job': 'slurm:c1:4241'})
    assert not reopened({**first, 'job': 'slurm:c2:4242'})  # another cluster's job 4242
    assert not reopened({'pid': 1, 'host': 'node-17', 'job': None, 'start': 0})
    assert not reopened({'pid': 1, 'host': 'node-17'})  # written before locks held a job
    live = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'],
                            stdin=subprocess.PIPE)
    try:
        assert not reopened({**first, 'pid': live.pid, 'host': socket.gethostname()})
    finally:
        live.communicate(b'')
    run.lock_file.write_text('')
    RunDir.reopen(run.checkpoint, epoch=0)
    assert 'its lock file is empty' in capsys.readouterr().out
    assert run.lock_holder() == lock_identity()


def test_the_lock_of_a_slurm_job_that_slurm_says_has_ended_is_taken_over(tmp_path, monkeypatch,
                                                                         capsys):
    """The next job of a chain (sbatch --dependency=afterany) after one killed past its time
    limit: another job id, another host, but squeue (asked with -t all: without it, it lists
    running and pending jobs only) says that job has ended, or answers 'Invalid job id' once it
    forgot it; its lock is taken over. A job it lists as running or pending, an answer it cannot
    read, and a job of another cluster (whose ids squeue here does not know) still refuse the
    run."""
    monkeypatch.delenv('SLURM_RESTART_COUNT', raising=False)
    monkeypatch.setenv('SLURM_JOB_ID', '5001')
    monkeypatch.setenv('SLURM_CLUSTER_NAME', 'c1')
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
    squeue = bin_dir / 'squeue'
    run = RunDir.create(tmp_path / 'runs', params={}, run_name='a')
    earlier = {'pid': 1, 'host': 'node-17', 'job': 'slurm:c1:5000', 'start': 0}
    for answer, taken in (('echo TIMEOUT', True), ('echo COMPLETED', True),
                          ('echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1',
                           True), ('echo RUNNING', False), ('echo PENDING', False), ('', False),
                          ('printf "COMPLETED\\nRUNNING\\n"', False),  # a task still runs
                          ('echo "squeue: error: Unable to contact slurm controller" >&2; exit 1',
                           False)):
        squeue.write_text(f'#!/bin/sh\n[ "$*" = "-h -t all -j 5000 -o %T" ] || exit 2\n'
                          f'{answer}\n')
        squeue.chmod(0o755)
        for holder in (earlier, {**earlier, 'job': 'slurm:c2:5000'}):
            run.lock_file.write_text(json.dumps(holder))
            if taken and holder is earlier:
                RunDir.reopen(run.checkpoint, epoch=0)
                assert 'on node-17: SLURM job 5000 has ended' in capsys.readouterr().out, answer
                assert run.lock_holder()['job'] == 'slurm:c1:5001'
            else:
                with pytest.raises(RunLockedError, match='PID 1 on node-17'):
                    RunDir.reopen(run.checkpoint, epoch=0)


def test_torchruns_restart_without_resume_continues_the_run_its_job_started(tmp_path, capsys):
    """torchrun --max-restarts without --resume auto: the restarted workers started a new run
    from epoch 0, leaving the job's run behind. A restart (TORCHELASTIC_RESTART_COUNT > 0)
    continues the latest run of its name that the same torchrun job started (the same agent, or
    the same --rdzv-id); another job's run, or a first start, starts a new run as asked."""
    from imagenet_ffcv import checkpoint, distributed
    env = {'TORCHELASTIC_RUN_ID': 'none', 'TORCHELASTIC_RESTART_COUNT': '0'}
    first = distributed.launch_identity(env)
    assert first['restart'] == 0 and first['rdzv'] is None and \
        first['agent'].startswith(f'{socket.gethostname()}:{os.getppid()}:')
    assert distributed.launch_identity({}) is None  # not torchrun
    run = RunDir.create(tmp_path, params={'logging': {'run_name': 'a'}, 'launch': first},
                        run_name='a')
    run.checkpoint.write_text('')
    run.unlock()
    restart = distributed.launch_identity({**env, 'TORCHELASTIC_RESTART_COUNT': '1'})
    assert checkpoint.resolve_resume('', tmp_path, 'a', first) is None  # the first start
    assert checkpoint.resolve_resume('', tmp_path, 'a', restart) == run.checkpoint
    assert "torchrun restart 1 of this job's workers: continuing the run it started" in \
        capsys.readouterr().out
    another_job = {**restart, 'agent': 'node-2:77:12345'}
    assert checkpoint.resolve_resume('', tmp_path, 'a', another_job) is None
    assert 'warning: torchrun restart 1' in capsys.readouterr().out
    newer = RunDir.create(tmp_path, params={'logging': {'run_name': 'a'}, 'launch': another_job},
                          run_name='a')  # another job's run of the same name, written later
    newer.checkpoint.write_text('')
    newer.unlock()
    os.utime(run.checkpoint, (1, 1))
    assert checkpoint.resolve_resume('', tmp_path, 'a', restart) == run.checkpoint
    assert checkpoint.resolve_resume('', tmp_path, 'b', restart) is None  # another run name
    rdzv = {**another_job, 'rdzv': 'job-7'}  # --rdzv-id: rank 0 may restart on another node
    run.params.write_text(json.dumps({'logging': {'run_name': 'a'}, 'launch': {**first,
                                                                              'rdzv': 'job-7'}}))
    assert checkpoint.resolve_resume('', tmp_path, 'a', rdzv) == run.checkpoint
    assert checkpoint.resolve_resume('', tmp_path, 'a', {**rdzv, 'rdzv': 'job-8'}) is None


def test_resume_auto_continues_only_a_run_of_its_own_name(tmp_path):
    runs = {name: RunDir.create(tmp_path, params={'logging': {'run_name': name}}, run_name=name)
            for name in ('a', 'b', '')}
    for run in runs.values():
        run.checkpoint.write_text('')
    os.utime(runs['a'].checkpoint, (1, 1))  # the oldest: the newest unnamed run would hide it
    assert {name: latest_checkpoint(tmp_path, name) for name in ('a', 'b', '', 'c')} \
        == {'a': runs['a'].checkpoint, 'b': runs['b'].checkpoint, '': runs[''].checkpoint,
            'c': None}


def test_a_new_run_beside_an_unfinished_one_of_its_name_says_so(tmp_path, capsys):
    """A job requeued without --resume auto started the run over without a word: a new run
    whose name's latest run has a checkpoint and no final weights prints a note naming it."""
    first = RunDir.create(tmp_path, params={'logging': {'run_name': 'a'}}, run_name='a')
    first.checkpoint.write_text('')
    capsys.readouterr()
    RunDir.create(tmp_path, params={'logging': {'run_name': 'b'}}, run_name='b')  # another name
    assert 'note' not in capsys.readouterr().out
    RunDir.create(tmp_path, params={'logging': {'run_name': 'a'}}, run_name='a')
    assert capsys.readouterr().out == (f'=> note: {first.path}, the latest run named a here, is '
                                       'unfinished; this starts a new run (--resume auto '
                                       'continues that one)\n')
    first.final_weights.write_text('')  # finished: nothing to say
    RunDir.create(tmp_path, params={'logging': {'run_name': 'a'}}, run_name='a')
    assert 'note' not in capsys.readouterr().out


def test_code_version_names_the_checkout(tmp_path):
    """The package's version (after a pip install, outside any checkout, the one record of the
    code a run used), the checkout's commit and whether it was changed."""
    import importlib.metadata
    version = code_version()
    try:  # make setup and CI install the package (pip install -e .)
        assert version['version'] == importlib.metadata.version('imagenet-ffcv')
    except importlib.metadata.PackageNotFoundError:
        assert version['version'] is None  # the package run from a folder, not installed
    head = subprocess.run(['git', '-C', str(REPO), 'rev-parse', 'HEAD'], capture_output=True,
                          text=True)
    if head.returncode != 0:
        assert version == {'version': version['version'], 'git_commit': None, 'git_dirty': None}
        pytest.skip('not a git checkout: nothing more to compare')
    assert version['git_commit'] == head.stdout.strip()
    status = subprocess.run(['git', '-C', str(REPO), 'status', '--porcelain',
                             '--untracked-files=no'], capture_output=True, text=True)
    assert version['git_dirty'] == bool(status.stdout.strip())


def test_code_version_of_a_package_installed_inside_a_checkout_names_no_commit(tmp_path,
                                                                               monkeypatch):
    """``pip install .`` into a virtual environment inside the checkout: git, asked in
    site-packages, answered with the checkout's commit, which the installed code need not be."""
    from imagenet_ffcv import run_dir
    subprocess.run(['git', 'init', '-q', str(tmp_path)], check=True)
    subprocess.run(['git', '-C', str(tmp_path), '-c', 'user.name=a', '-c', 'user.email=a@b',
                    'commit', '-q', '--allow-empty', '-m', 'x'], check=True)
    site_packages = tmp_path / '.venv' / 'lib' / 'python3' / 'site-packages'
    site_packages.mkdir(parents=True)
    monkeypatch.setattr(run_dir, 'REPO', site_packages)
    assert code_version()['git_commit'] is None and code_version()['git_dirty'] is None
    monkeypatch.setattr(run_dir, 'REPO', tmp_path)
    assert len(code_version()['git_commit']) == 40


def test_a_lock_another_job_took_over_meanwhile_is_not_taken_again_and_a_lost_lock_stops_writes(
        tmp_path, monkeypatch, capsys):
    """Two jobs that found the same dead job's lock both took it over: the second deleted the
    lock the first had just made, and both wrote the run. The lock is now read again before it is
    taken over, so the job that took it first keeps it; and a job whose lock another job has
    (two take-overs at the same instant; a lock deleted by hand and taken) writes nothing more:
    its log, checkpoint and results writes stop with RunLockedError naming the holder, and its
    heartbeat says so at once."""
    run = RunDir.create(tmp_path, params={}, run_name='a')
    run.unlock()
    live = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'],
                            stdin=subprocess.PIPE)
    try:
        winner = {**lock_identity(), 'pid': live.pid, 'started': process_start(live.pid)}
        run.lock_file.write_text(json.dumps({'pid': 1, 'host': 'node-17'}))
        judge = run_lock.lock_ended

        def judged_ended_then_taken(holder, me):  # the other job takes it over as this one judges
            if holder != winner:
                run.lock_file.write_text(json.dumps(winner))
                return 'gone (simulated)'
            return judge(holder, me)
        monkeypatch.setattr(run_lock, 'lock_ended', judged_ended_then_taken)
        with pytest.raises(RunLockedError, match=f'PID {live.pid} on {winner["host"]}'):
            RunDir.reopen(run.checkpoint, epoch=0)
        assert run.lock_holder() == winner and 'taking over' not in capsys.readouterr().out
    finally:
        live.communicate(b'')
    monkeypatch.undo()
    run.lock_file.unlink()
    mine = RunDir.reopen(run.checkpoint, epoch=0)
    mine.append_log({'epoch': 0})
    other = {'pid': 1, 'host': 'node-17', 'heartbeat_s': 30}
    mine.lock_file.write_text(json.dumps(other))
    for write in (lambda: mine.append_log({'epoch': 1}), lambda: mine.write_results({})):
        with pytest.raises(RunLockedError, match=r"this job's lock \(.*\) is now held by PID 1 on "
                                                 r"node-17; this job stops without writing"):
            write()
    assert mine.read_log() == [{'epoch': 0}] and not mine.results.exists()
    beat = run_lock.Heartbeat(mine.lock_file, {**lock_identity(), 'heartbeat_s': 0.05})
    beat.start()
    beat.join(30)
    assert not beat.is_alive() and mine.lock_holder() == other
    assert 'another job (PID 1 on node-17) has taken over this job\'s lock; this job stops at ' \
           'its next write' in capsys.readouterr().out
    mine.unlock()
    assert mine.lock_holder() == other  # not this job's to remove
    mine.lock_file.unlink()
    again = RunDir.reopen(run.checkpoint, epoch=1)
    again.lock_file.unlink()  # removed by hand, taken by no job: the job writes on
    again.append_log({'epoch': 1})
    assert again.read_log() == [{'epoch': 0}, {'epoch': 1}]
    beat = run_lock.Heartbeat(again.lock_file, {**lock_identity(), 'heartbeat_s': 0.05})
    beat.start()
    beat.join(30)
    assert "this job's lock was removed: another job may take the run over" in \
        capsys.readouterr().out
