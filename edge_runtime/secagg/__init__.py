"""Secure aggregation (Bonawitz et al., CCS 2017), shared by both daemons: crypto, Shamir
sharing and its robust decoding, the ring encoding, messages, client and server (whose
unmasking verifies every rebuilt secret and names devices revealing wrong shares), and the
bodies of the `SecAggEnvelope` frames that carry them over MQTT.

The public door: code outside `edge_runtime.secagg` imports from here.
"""

from edge_runtime.secagg.bodies import (
    forwarded_body,
    masked_input_from_body,
    message_body,
    parse_forwarded,
    parse_message,
    parse_roster,
    quantization_of,
    reconstruction_threshold,
    roster_body,
    secagg_round_id,
)
from edge_runtime.secagg.client import SecAggClient
from edge_runtime.secagg.config import SecAggConfig, SecAggResult, ShareFault, ShareRejection
from edge_runtime.secagg.crypto import (
    COMMITMENT_BYTES,
    SHARE_BOX_PURPOSE,
    agree_seed,
    commit_self_mask_seed,
    expand_seed,
    open_share_box,
    share_box_aad,
)
from edge_runtime.secagg.decoding import Decoding, ShareDecoder
from edge_runtime.secagg.in_process import run_round_in_process
from edge_runtime.secagg.messages import (
    SECAGG_MESSAGE_CLASSES,
    AdvertiseKeys,
    MaskedInput,
    SecAggAbort,
    SecAggError,
    SecAggRefusal,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from edge_runtime.secagg.reconstruction import ReconstructionAbort, rebuild_secrets
from edge_runtime.secagg.ring import (
    QuantizationConfig,
    TensorLayout,
    dequantize_sum,
    flatten_delta,
    quantization_error_bound,
    quantize_delta,
    ring_vector_from_bytes,
)
from edge_runtime.secagg.server import SecAggServer
from edge_runtime.secagg.shamir import PRIME, reconstruct_secret, split_secret

__all__ = [
    "COMMITMENT_BYTES",
    "AdvertiseKeys",
    "Decoding",
    "MaskedInput",
    "PRIME",
    "QuantizationConfig",
    "ReconstructionAbort",
    "SECAGG_MESSAGE_CLASSES",
    "SHARE_BOX_PURPOSE",
    "SecAggAbort",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggRefusal",
    "SecAggResult",
    "SecAggServer",
    "ShareDecoder",
    "ShareFault",
    "ShareKeys",
    "ShareRejection",
    "TensorLayout",
    "UnmaskRequest",
    "UnmaskResponse",
    "agree_seed",
    "commit_self_mask_seed",
    "dequantize_sum",
    "expand_seed",
    "flatten_delta",
    "forwarded_body",
    "masked_input_from_body",
    "message_body",
    "open_share_box",
    "parse_forwarded",
    "parse_message",
    "parse_roster",
    "quantization_error_bound",
    "quantization_of",
    "quantize_delta",
    "rebuild_secrets",
    "reconstruct_secret",
    "reconstruction_threshold",
    "ring_vector_from_bytes",
    "roster_body",
    "run_round_in_process",
    "secagg_round_id",
    "share_box_aad",
    "split_secret",
]
