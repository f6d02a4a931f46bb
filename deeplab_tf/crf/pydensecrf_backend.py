"""The pydensecrf backend: Krähenbühl's C++ dense CRF through the ``pydensecrf2`` package
(the ``pydensecrf`` module, an optional dependency), and the worker pools that run many
images at once."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np

from deeplab_tf.crf.params import PROBABILITY_FLOOR, CRFParams


def pydensecrf_available() -> bool:
    """Whether the ``pydensecrf`` module (package ``pydensecrf2``) can be imported."""
    return importlib.util.find_spec("pydensecrf") is not None


def refine_pydensecrf(image: np.ndarray, probabilities: np.ndarray, params: CRFParams):
    import pydensecrf.densecrf as dcrf  # optional dependency, imported when used

    h, w, c = probabilities.shape
    unary = -np.log(np.clip(probabilities.reshape(-1, c).T, PROBABILITY_FLOOR, 1.0))
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    # Same kernel order as the TensorFlow backend, so float sums agree.
    crf.addPairwiseGaussian(sxy=params.sg, compat=params.w2)
    # pydensecrf takes a writable C-contiguous buffer (PIL's arrays are read-only).
    rgb = np.array(image, order="C", copy=not image.flags.writeable or None)
    crf.addPairwiseBilateral(sxy=params.sa, srgb=params.sb, rgbim=rgb, compat=params.w1)
    q = np.asarray(crf.inference(params.iterations), dtype=np.float32)
    return np.ascontiguousarray(q.T.reshape(h, w, c))


# Worker-process state: the (image, probabilities[, labels]) tuples of a pool. With the
# fork start method children inherit it without copies; elsewhere it is pickled once
# per worker by the initializer, never once per task.
WORKER_DATA: list[tuple[np.ndarray, ...]] = []


def _set_worker_data(data: list[tuple[np.ndarray, ...]]) -> None:
    global WORKER_DATA
    WORKER_DATA = data
    _exit_with_parent()


def _exit_with_parent(every_s: float = 1.0) -> None:
    """Ends this worker process when its parent is gone. A parent killed with SIGKILL
    cannot stop its pool, and the workers, waiting on a queue whose other end they
    hold themselves, would otherwise live on (holding their copy of the data)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def worker_pool(backend: str, workers: int | None, data: list[tuple[np.ndarray, ...]]) -> Executor:
    """Worker processes holding ``data`` (pydensecrf) or threads (TensorFlow)."""
    workers = workers or os.cpu_count() or 1
    if backend == "tensorflow":
        # Threads suffice: TensorFlow releases the GIL while its ops run.
        return ThreadPoolExecutor(max_workers=workers)
    # fork: the children share the parent's arrays; they run only numpy and the C++
    # CRF, never TensorFlow, so TensorFlow's threads in the parent do not matter.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context(method),
        initializer=_set_worker_data,
        initargs=(data,),
    )


def refine_cached_pair(index: int, params: CRFParams) -> np.ndarray:
    image, probabilities = WORKER_DATA[index][:2]
    return refine_pydensecrf(image, probabilities, params)
