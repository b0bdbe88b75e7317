import jax


# Gradients are compared against independent references to 1e-4 relative error or
# better, which float32 cannot resolve.
jax.config.update("jax_enable_x64", True)
