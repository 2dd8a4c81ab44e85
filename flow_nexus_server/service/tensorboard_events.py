"""A TensorBoard event writer for the controller without torch: the controller holds no model, and
importing torch only to write scalars cost it about 2 s and a few hundred MiB. It writes what
``torch.utils.tensorboard.SummaryWriter`` would for our records (scalars, and the hparams plugin's
experiment / session start / session end), through TensorBoard's own ``EventFileWriter`` and protos.
"""

from __future__ import annotations

import time
from typing import Any

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams.api_pb2 import DataType, Experiment, HParamInfo, MetricInfo, MetricName, Status
from tensorboard.plugins.hparams.metadata import (
    EXPERIMENT_TAG,
    PLUGIN_DATA_VERSION,
    PLUGIN_NAME,
    SESSION_END_INFO_TAG,
    SESSION_START_INFO_TAG,
)
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo, SessionStartInfo
from tensorboard.summary.writer.event_file_writer import EventFileWriter

# TensorBoard knows no "stopped on request": that one, like interrupted, ends unknown.
END_STATUS = {"completed": Status.STATUS_SUCCESS, "failed": Status.STATUS_FAILURE}


class EventWriter:
    """One run's event file (``events.out.tfevents.*`` in ``log_dir``)."""

    def __init__(self, log_dir: str, flush_secs: int = 5) -> None:
        self._file = EventFileWriter(log_dir, flush_secs=flush_secs)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._add(Summary(value=[Summary.Value(tag=tag, simple_value=float(value))]), step)

    def add_hparams_start(self, hparams: dict[str, Any], metrics: tuple[str, ...]) -> None:
        """The experiment (which hparams and metrics exist) and this run's values, as the hparams
        dashboard reads them."""
        start, infos = SessionStartInfo(), []
        for name, value in hparams.items():
            if isinstance(value, bool):
                start.hparams[name].bool_value, kind = value, "DATA_TYPE_BOOL"
            elif isinstance(value, str):
                start.hparams[name].string_value, kind = value, "DATA_TYPE_STRING"
            else:
                start.hparams[name].number_value, kind = float(value), "DATA_TYPE_FLOAT64"
            infos.append(HParamInfo(name=name, type=DataType.Value(kind)))
        experiment = Experiment(hparam_infos=infos, metric_infos=[MetricInfo(name=MetricName(tag=m)) for m in metrics])
        self._add(_plugin_summary(EXPERIMENT_TAG, HParamsPluginData(experiment=experiment)))
        self._add(_plugin_summary(SESSION_START_INFO_TAG, HParamsPluginData(session_start_info=start)))

    def add_hparams_end(self, status: str) -> None:
        end = SessionEndInfo(status=END_STATUS.get(status, Status.STATUS_UNKNOWN))
        self._add(_plugin_summary(SESSION_END_INFO_TAG, HParamsPluginData(session_end_info=end)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def _add(self, summary: Summary, step: int | None = None) -> None:
        event = Event(summary=summary, wall_time=time.time())
        if step is not None:
            event.step = step
        self._file.add_event(event)


def _plugin_summary(tag: str, content: HParamsPluginData) -> Summary:
    content.version = PLUGIN_DATA_VERSION
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME,
                                                                      content=content.SerializeToString()))
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata)])
