"""Megatron-LM integration: ``--mates-*`` arguments, the MATES train data loader, the step-end call point.

How the pieces plug into Megatron-LM's ``pretrain()`` (``pretrain_gpt.py``), each a guarded call in
``patches/megatron-lm-core_v0.16.1-mates.patch``:

- ``add_mates_args(parser)`` (``args``) is an ``extra_args_provider``: ``--mates`` switches the plugin on,
  ``--mates-config YAML`` gives a SelectionConfig mapping, ``--mates-reference JSONL`` the reference set,
  and one ``--mates-<field>`` flag per config field overrides the file. ``mates_config_from_args(args)`` is
  the one edge that turns them into a typed SelectionConfig (``mates_megatron.configio``).
- ``mates_train_valid_test_num_samples`` sizes the train split as the candidate pool (1/selection_ratio x
  the samples trained on); ``mates_train_data_loader(train_ds, consumed_samples)`` (``state``) replaces
  ``build_pretraining_data_loader`` for the train split: it builds the plugin (``mates_megatron.plugin``)
  and the host (``host.MegatronLMHost``), and serves MatesSampler's selection (``loader``).
- ``mates_step_end(iteration, model, optimizer, opt_param_scheduler)`` runs after every ``train_step``: at a
  round boundary the round scores the next round's candidates on the live model and publishes its selection.
- ``save_mates_state`` / ``load_mates_state`` keep the plugin state in ``iter_NNNNNNN/mates_state.pt``
  beside each checkpoint. Loading happens when the loader is built on resume.

Why a patch: Megatron-LM has no training-loop callback, no way to replace the train data loader or to size
the train split from ``pretrain()``'s arguments, no plugin slot in ``save_checkpoint``, and ``pretrain_gpt.py``
hard-codes its ``extra_args_provider`` and builds datasets only on the first/last pipeline stage of tensor
rank 0, while the probes run the model (and need its samples) on every rank.

This package imports without Megatron-LM's ``megatron.training`` (only megatron-core is needed); the few
functions that read Megatron-LM's global state import it when called.
"""

from mates_megatron.integrations.megatron_lm.args import (
    add_mates_args,
    mates_config_from_args,
    mates_flags,
    mates_train_valid_test_num_samples,
)
from mates_megatron.integrations.megatron_lm.host import MegatronLMHost, MegatronTextTokenizer
from mates_megatron.integrations.megatron_lm.loader import MatesDataLoader, build_mates_data_loader
from mates_megatron.integrations.megatron_lm.state import (
    STATE_FORMAT,
    MatesState,
    get_mates_state,
    load_mates_state,
    mates_state_dict,
    mates_state_path,
    mates_step_end,
    mates_train_data_loader,
    save_mates_state,
    set_mates_state,
)

__all__ = [
    "STATE_FORMAT",
    "MatesDataLoader",
    "MatesState",
    "MegatronLMHost",
    "MegatronTextTokenizer",
    "add_mates_args",
    "build_mates_data_loader",
    "get_mates_state",
    "load_mates_state",
    "mates_config_from_args",
    "mates_flags",
    "mates_state_dict",
    "mates_state_path",
    "mates_step_end",
    "mates_train_data_loader",
    "mates_train_valid_test_num_samples",
    "save_mates_state",
    "set_mates_state",
]
