"""dnnr_jax: Dynamic Neural Network Refinement in JAX/Flax."""

from dnnr_jax.checkpoint import LoadedModel as LoadedModel
from dnnr_jax.checkpoint import load_model as load_model
from dnnr_jax.checkpoint import save_checkpoint as save_checkpoint
from dnnr_jax.complexity import batch_complexity as batch_complexity
from dnnr_jax.config import Config as Config
from dnnr_jax.config import config_from_dict as config_from_dict
from dnnr_jax.config import load_config as load_config
from dnnr_jax.data import Dataset as Dataset
from dnnr_jax.data import Split as Split
from dnnr_jax.data import load_dataset as load_dataset
from dnnr_jax.errors import CheckpointError as CheckpointError
from dnnr_jax.errors import ConfigError as ConfigError
from dnnr_jax.errors import DataError as DataError
from dnnr_jax.errors import DnnrError as DnnrError
from dnnr_jax.fit import FitResult as FitResult
from dnnr_jax.fit import fit as fit
from dnnr_jax.jobs import evaluate_checkpoint as evaluate_checkpoint
from dnnr_jax.jobs import train_and_save as train_and_save
from dnnr_jax.model import DynamicMLP as DynamicMLP
from dnnr_jax.model import init_variables as init_variables
from dnnr_jax.model import model_from_config as model_from_config
from dnnr_jax.routing import route as route
from dnnr_jax.thresholds import linear_annealing as linear_annealing
from dnnr_jax.train import TrainState as TrainState
from dnnr_jax.train import create_train_state as create_train_state
from dnnr_jax.train import evaluate as evaluate
from dnnr_jax.train import train_epoch as train_epoch
from dnnr_jax.train import train_step as train_step

__version__ = '0.1.0'
