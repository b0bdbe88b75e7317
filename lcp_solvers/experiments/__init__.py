"""The paper's experiments as reusable pieces: offline data, the recurrent equilibrium
network, the layered (dense and convolutional) networks and the convolutional DEQ,
their update rules (recurrent backprop and the least-control variants), and the
few-shot meta-learning task with complex synapses. The `lcp-solvers` command
(`lcp_solvers_cli`) runs them.

They sit on top of the library and use only its public names (`import lcp_solvers as
lcp`); the library itself never imports this subpackage.

Needs the `examples` extra (`optax`, `scikit-learn`, `mnist1d`) for training and data;
importing `lcp_solvers` itself never imports them.
"""

from ._convnets import (
    ConvDEQ as ConvDEQ,
    ConvDEQCell as ConvDEQCell,
    ConvFeedforward as ConvFeedforward,
)
from ._data import (
    Dataset as Dataset,
    load_cifar10 as load_cifar10,
    load_dataset as load_dataset,
    load_digits as load_digits,
    load_mnist as load_mnist,
    load_mnist1d as load_mnist1d,
    read_idx as read_idx,
)
from ._eqnet import (
    cross_entropy as cross_entropy,
    EquilibriumNetwork as EquilibriumNetwork,
)
from ._layered import (
    AbstractLayeredNetwork as AbstractLayeredNetwork,
    Feedforward as Feedforward,
)
from ._meta import (
    ComplexSynapseLearner as ComplexSynapseLearner,
    descend as descend,
    init_mlp as init_mlp,
    meta_gradient as meta_gradient,
    meta_train as meta_train,
    sample_sinusoid_tasks as sample_sinusoid_tasks,
    SinusoidTasks as SinusoidTasks,
)
from ._model import AbstractEquilibriumModel as AbstractEquilibriumModel
from ._sharding import (
    Collective as Collective,
    find_collectives as find_collectives,
    replicate as replicate,
    shard_batch as shard_batch,
)
from ._train import (
    AbstractUpdateRule as AbstractUpdateRule,
    evaluate as evaluate,
    free_equilibrium as free_equilibrium,
    LeastControl as LeastControl,
    LeastControlDropIn as LeastControlDropIn,
    predict as predict,
    RecurrentBackprop as RecurrentBackprop,
    train_classifier as train_classifier,
)
