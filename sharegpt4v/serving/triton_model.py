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

from sharegpt4v.serving.engine import ServingEngine, device_for, internal_failure, request_ids


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
    def _response(outputs):
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])

    @staticmethod
    def _error(message, code):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def _reply(self, reply):
        """The engine's reply; its error is a bad request: INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT)."""
        if reply.error is not None:
            return self._error(reply.error, pb_utils.TritonError.INVALID_ARG)
        return self._response(reply.outputs)

    def _failed(self, exc, requests):
        """An internal failure fails this batch, not the server: logged here with each request's id,
        answered INTERNAL (HTTP 500) with that id and no exception text."""
        log, messages = internal_failure(exc, request_ids(r.request_id() for r in requests))
        pb_utils.Logger.log_error(log)
        return [self._error(m, pb_utils.TritonError.INTERNAL) for m in messages]

    def execute(self, requests):
        if not self.decoupled:
            try:
                return [self._reply(reply) for reply in self.engine.infer([self._inputs(r) for r in requests])]
            except Exception as exc:
                return self._failed(exc, requests)
        senders = [r.get_response_sender() for r in requests]
        try:
            inputs = [self._inputs(r) for r in requests]
            replies = self.engine.stream(inputs, lambda i, outputs: senders[i].send(self._response(outputs)))
            finals = [self._reply(reply) for reply in replies]
        except Exception as exc:
            finals = self._failed(exc, requests)
        for request, sender, final in zip(requests, senders, finals):
            try:  # one closed stream must not leave the others without their final response
                sender.send(final, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as exc:
                pb_utils.Logger.log_error(internal_failure(exc, request_ids([request.request_id()]))[0])
        return None
