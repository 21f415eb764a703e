"""The Triton Python-backend model: Triton tensors <-> `sharegpt4v.serving.engine.ServingEngine`.

Every served model's `model.py` (`captioner`, `chat`, the decoupled `chat_stream`) only imports
`TritonPythonModel` from here; the model's `parameters` (config.pbtxt) say what it serves and
where its weights are. Request checks, prompts and generation live in the engine. Only Triton's
Python stub imports this module: `triton_python_backend_utils` exists nowhere else, and nothing
else in the package imports it.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from sharegpt4v.serving.engine import ServingEngine, device_for


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        device = device_for(args["model_instance_kind"], args["model_instance_device_id"])
        self.engine = ServingEngine.load(version_dir, config.get("parameters", {}), device)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)

    def _inputs(self, request):
        tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in self.engine.input_names}
        return {name: None if t is None else t.as_numpy() for name, t in tensors.items()}

    @staticmethod
    def _response(outputs=None, error=None):
        if error is not None:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])

    def execute(self, requests):
        inputs = [self._inputs(r) for r in requests]
        if not self.decoupled:
            try:
                replies = self.engine.infer(inputs)
            except Exception as exc:  # an engine failure fails this batch, not the server
                return [self._response(error=f"internal error: {type(exc).__name__}: {exc}") for _ in requests]
            return [self._response(reply.outputs, reply.error) for reply in replies]
        senders = [r.get_response_sender() for r in requests]
        try:
            replies = self.engine.stream(inputs, lambda i, outputs: senders[i].send(self._response(outputs)))
            finals = [self._response(reply.outputs, reply.error) for reply in replies]
        except Exception as exc:
            finals = [self._response(error=f"internal error: {type(exc).__name__}: {exc}") for _ in requests]
        for sender, final in zip(senders, finals):
            sender.send(final, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
