import os


# The suite compiles hundreds of small programs and runs each for milliseconds: XLA's
# LLVM optimisations cost more compile time than they save (about 20% of the suite
# on 2 cores). Set before JAX starts its backend; a user's own XLA_FLAGS come first.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


# Gradients are compared against independent references to 1e-4 relative error or
# better, which float32 cannot resolve.
jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    yield
    # Every compiled XLA program keeps memory mappings alive. The whole suite's
    # programs pass Linux's default limit of 65,530 mappings per process
    # (vm.max_map_count), where XLA's compiler segfaults; free them per module.
    jax.clear_caches()
