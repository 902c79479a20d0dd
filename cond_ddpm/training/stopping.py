"""Stopping a run at a step boundary with a checkpoint, on SIGTERM / SIGINT (a pre-empted job, Ctrl-C): a flag the
loop checks, agreed on by every process, and data-loader workers that leave the stopping to the main process."""

import multiprocessing
import os
import signal
import threading


class StopRequested(Exception):
    """Raised inside validation sampling when a stop was requested, to abandon the samples."""


class StopRequest:
    """Turns SIGTERM / SIGINT (a pre-empted job, Ctrl-C) into a flag the loop checks at each step boundary, and that
    ends validation sampling at its next step. A second signal is not caught: it stops the run at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        self.restore()

    def check_during_sampling(self, pipeline, step, timestep, tensors):
        """A pipeline's `callback_on_step_end`: sampling a validation grid takes minutes with 1000 DDPM steps."""
        if self.received is not None:
            raise StopRequested(self.received)

    def now(self, accelerator, sync_point: bool) -> bool:
        """Whether to stop at this step. All processes must stop at the same step, so with several they agree
        through a collective, at the sync points (logging steps) only; one process decides alone, at every step."""
        if accelerator.num_processes == 1:
            return self.received is not None
        if self.received is not None:
            accelerator.set_trigger()
        return sync_point and accelerator.check_trigger()

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def leave_stopping_to_the_main_process(worker_id: int):
    """A DataLoader worker's `worker_init_fn`. Ctrl-C, `timeout`, `kill -- -PGID` and Slurm signal every process of a
    job, and a worker killed by that makes the main process crash instead of stopping with a checkpoint
    (`StopRequest`). So workers ignore SIGINT, and take SIGTERM from the main process only: it sends one to end them
    as it exits. (torch's own worker handler draws the same line, but dies of anyone else's SIGTERM.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # Linux; macOS and Windows keep torch's handler
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the block
        threading.Thread(target=exit_on_sigterm_from_the_main_process, name="sigterm-filter", daemon=True).start()


def exit_on_sigterm_from_the_main_process():
    main_process = multiprocessing.parent_process().pid  # not os.getppid(): under forkserver that is the server
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main_process:
        pass
    os._exit(0)
