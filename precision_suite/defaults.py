"""One default per option, shared by the CLI, the Python API and the pytest plugin.

Every default a user can leave out is written here once, and each entry point reads it from here:
``Case``/``Matrix``/``run_matrix``/``run_case`` (``spec``), ``precision-suite run``/``compare``/
``probe`` (``cli``, its help texts included), the plugin's options (``pytest_plugin``,
``pytest_session``) and ``compare.Tolerances``. The module imports nothing, so ``--help`` and the
plugin, which every pytest run in an environment with the package imports, read it for free.
What the values may be is checked elsewhere (``spec``); ``precision-suite list`` prints them.
"""

__all__ = ["DEFAULTS", "DEVICES", "OUT", "THREADS", "TOLERANCES", "PROBE"]

# the matrix axes (lists: one value each unless the axis has several) and the single-valued chain options
DEFAULTS = dict(
    # xavier_normal is lecun_normal for square layers: the default keeps one of the two
    inits=["normal", "lecun_normal", "kaiming_normal", "torch_default", "orthogonal",
           "kaiming_normal(gain=1.2)", "lecun_normal(gain=0.5)"],
    activations=["identity", "relu", "gelu", "tanh", "silu"],
    formats=["fp32", "fp16", "bf16"],
    backends=["torch"],
    norms=["none"],
    inputs=["normal"],
    depth=[100],
    width=[128],
    batch=[64],
    seed=[0],
    residual=None,
    bias=False,
    underflow_threshold=0.01,  # fraction of a tensor's elements: the underflow event
    loss_scale=1.0,
)

# the devices a default run covers: ``run`` and the API keep the ones present here
# (``spec.default_devices``), the plugin makes a test of each and skips the absent ones
DEVICES = ("cpu", "cuda")

OUT = "reports"  # output directory of run and probe: OUT/results.json, OUT/report.html

THREADS = 1  # torch/BLAS threads per process when neither --threads nor OMP_NUM_THREADS says (runner.torch_threads)

# compare: layers a judged event may move; drift of log2 rms/amax (bits) and of a fraction statistic reported beyond
TOLERANCES = dict(layers=0, bits=0.25, fraction=0.01)

# probe's own axes (the chain options it shares with run, threshold, loss scale and seed, are DEFAULTS')
PROBE = dict(formats=("fp16", "bf16"), modes=("emulated", "autocast"), device="cpu")
