"""vLLM process control and HTTP client.

`VLLMServer` owns a server child process (start, health wait, stop by process group);
`VLLMClient` talks to any running server, ours or one the user started.
"""

from example_trainer.vllm.client import Completion, GenerationAborted, VLLMClient, VLLMError
from example_trainer.vllm.server import (
    PortInUseError,
    VLLMServer,
    VLLMStartupError,
    cuda_available,
    free_port,
    port_in_use,
)

__all__ = [
    "Completion",
    "GenerationAborted",
    "PortInUseError",
    "VLLMClient",
    "VLLMError",
    "VLLMServer",
    "VLLMStartupError",
    "cuda_available",
    "free_port",
    "port_in_use",
]
