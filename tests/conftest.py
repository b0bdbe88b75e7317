import jax
import pytest


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
