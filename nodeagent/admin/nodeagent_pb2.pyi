from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ConfigStatus(_message.Message):
    __slots__ = ("version", "loaded_at", "sources", "last_error", "last_error_at", "warnings", "watches", "source")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_AT_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    WATCHES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    version: int
    loaded_at: float
    sources: _containers.RepeatedScalarFieldContainer[str]
    last_error: str
    last_error_at: float
    warnings: _containers.RepeatedScalarFieldContainer[str]
    watches: _containers.RepeatedCompositeFieldContainer[WatchStatus]
    source: str
    def __init__(self, version: _Optional[int] = ..., loaded_at: _Optional[float] = ..., sources: _Optional[_Iterable[str]] = ..., last_error: _Optional[str] = ..., last_error_at: _Optional[float] = ..., warnings: _Optional[_Iterable[str]] = ..., watches: _Optional[_Iterable[_Union[WatchStatus, _Mapping]]] = ..., source: _Optional[str] = ...) -> None: ...

class WatchStatus(_message.Message):
    __slots__ = ("kind", "state", "resource_version", "objects", "last_event_at", "lag_seconds", "last_error", "relists")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_AT_FIELD_NUMBER: _ClassVar[int]
    LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    RELISTS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    state: str
    resource_version: str
    objects: int
    last_event_at: float
    lag_seconds: float
    last_error: str
    relists: int
    def __init__(self, kind: _Optional[str] = ..., state: _Optional[str] = ..., resource_version: _Optional[str] = ..., objects: _Optional[int] = ..., last_event_at: _Optional[float] = ..., lag_seconds: _Optional[float] = ..., last_error: _Optional[str] = ..., relists: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("version", "node", "uptime_seconds", "cpu_percent", "memory_rss_bytes", "redirect_mode", "ready", "config", "ca", "jwks", "limits", "workers")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_MODE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CA_FIELD_NUMBER: _ClassVar[int]
    JWKS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    version: str
    node: str
    uptime_seconds: float
    cpu_percent: float
    memory_rss_bytes: int
    redirect_mode: str
    ready: bool
    config: ConfigStatus
    ca: CaStatus
    jwks: _containers.RepeatedCompositeFieldContainer[JwksStatus]
    limits: _containers.RepeatedCompositeFieldContainer[Limit]
    workers: _containers.RepeatedCompositeFieldContainer[Worker]
    def __init__(self, version: _Optional[str] = ..., node: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., cpu_percent: _Optional[float] = ..., memory_rss_bytes: _Optional[int] = ..., redirect_mode: _Optional[str] = ..., ready: _Optional[bool] = ..., config: _Optional[_Union[ConfigStatus, _Mapping]] = ..., ca: _Optional[_Union[CaStatus, _Mapping]] = ..., jwks: _Optional[_Iterable[_Union[JwksStatus, _Mapping]]] = ..., limits: _Optional[_Iterable[_Union[Limit, _Mapping]]] = ..., workers: _Optional[_Iterable[_Union[Worker, _Mapping]]] = ...) -> None: ...

class Worker(_message.Message):
    __slots__ = ("index", "pid", "state", "memory_rss_bytes", "cpu_percent", "connections", "restarts")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    pid: int
    state: str
    memory_rss_bytes: int
    cpu_percent: float
    connections: int
    restarts: int
    def __init__(self, index: _Optional[int] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., memory_rss_bytes: _Optional[int] = ..., cpu_percent: _Optional[float] = ..., connections: _Optional[int] = ..., restarts: _Optional[int] = ...) -> None: ...

class Limit(_message.Message):
    __slots__ = ("name", "value", "flag", "metric", "hits")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    flag: str
    metric: str
    hits: int
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ..., flag: _Optional[str] = ..., metric: _Optional[str] = ..., hits: _Optional[int] = ...) -> None: ...

class JwksStatus(_message.Message):
    __slots__ = ("uri", "keys", "last_error")
    URI_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    uri: str
    keys: int
    last_error: str
    def __init__(self, uri: _Optional[str] = ..., keys: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...

class CaStatus(_message.Message):
    __slots__ = ("state", "address", "last_error", "last_error_at", "unreachable_since", "last_success_at", "next_renewal_at")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_AT_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_SINCE_FIELD_NUMBER: _ClassVar[int]
    LAST_SUCCESS_AT_FIELD_NUMBER: _ClassVar[int]
    NEXT_RENEWAL_AT_FIELD_NUMBER: _ClassVar[int]
    state: str
    address: str
    last_error: str
    last_error_at: float
    unreachable_since: float
    last_success_at: float
    next_renewal_at: float
    def __init__(self, state: _Optional[str] = ..., address: _Optional[str] = ..., last_error: _Optional[str] = ..., last_error_at: _Optional[float] = ..., unreachable_since: _Optional[float] = ..., last_success_at: _Optional[float] = ..., next_renewal_at: _Optional[float] = ...) -> None: ...

class WorkloadsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Workload(_message.Message):
    __slots__ = ("namespace", "name", "node", "service_account", "identity", "ip", "labels", "local", "capture", "netns", "kind")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_FIELD_NUMBER: _ClassVar[int]
    NETNS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    node: str
    service_account: str
    identity: str
    ip: str
    labels: _containers.ScalarMap[str, str]
    local: bool
    capture: str
    netns: str
    kind: str
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., node: _Optional[str] = ..., service_account: _Optional[str] = ..., identity: _Optional[str] = ..., ip: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., local: _Optional[bool] = ..., capture: _Optional[str] = ..., netns: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class WorkloadsResponse(_message.Message):
    __slots__ = ("workloads",)
    WORKLOADS_FIELD_NUMBER: _ClassVar[int]
    workloads: _containers.RepeatedCompositeFieldContainer[Workload]
    def __init__(self, workloads: _Optional[_Iterable[_Union[Workload, _Mapping]]] = ...) -> None: ...

class ServicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceEndpoint(_message.Message):
    __slots__ = ("pod", "ip", "port", "node")
    POD_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    pod: str
    ip: str
    port: int
    node: str
    def __init__(self, pod: _Optional[str] = ..., ip: _Optional[str] = ..., port: _Optional[int] = ..., node: _Optional[str] = ...) -> None: ...

class ServicePort(_message.Message):
    __slots__ = ("name", "port", "target_port", "protocol", "app_protocol", "endpoints")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TARGET_PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    APP_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    port: int
    target_port: str
    protocol: str
    app_protocol: str
    endpoints: _containers.RepeatedCompositeFieldContainer[ServiceEndpoint]
    def __init__(self, name: _Optional[str] = ..., port: _Optional[int] = ..., target_port: _Optional[str] = ..., protocol: _Optional[str] = ..., app_protocol: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[ServiceEndpoint, _Mapping]]] = ...) -> None: ...

class Service(_message.Message):
    __slots__ = ("namespace", "name", "cluster_ip", "ports")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_IP_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    cluster_ip: str
    ports: _containers.RepeatedCompositeFieldContainer[ServicePort]
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., cluster_ip: _Optional[str] = ..., ports: _Optional[_Iterable[_Union[ServicePort, _Mapping]]] = ...) -> None: ...

class ServicesResponse(_message.Message):
    __slots__ = ("services",)
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[Service]
    def __init__(self, services: _Optional[_Iterable[_Union[Service, _Mapping]]] = ...) -> None: ...

class ConnectionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Connection(_message.Message):
    __slots__ = ("id", "direction", "pod", "source", "destination", "upstream", "service", "peer_workload", "bytes_sent", "bytes_received", "opened_at", "worker")
    ID_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    PEER_WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    OPENED_AT_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    id: int
    direction: str
    pod: str
    source: str
    destination: str
    upstream: str
    service: str
    peer_workload: str
    bytes_sent: int
    bytes_received: int
    opened_at: float
    worker: int
    def __init__(self, id: _Optional[int] = ..., direction: _Optional[str] = ..., pod: _Optional[str] = ..., source: _Optional[str] = ..., destination: _Optional[str] = ..., upstream: _Optional[str] = ..., service: _Optional[str] = ..., peer_workload: _Optional[str] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., opened_at: _Optional[float] = ..., worker: _Optional[int] = ...) -> None: ...

class ConnectionsResponse(_message.Message):
    __slots__ = ("connections",)
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    connections: _containers.RepeatedCompositeFieldContainer[Connection]
    def __init__(self, connections: _Optional[_Iterable[_Union[Connection, _Mapping]]] = ...) -> None: ...

class ConfigDumpRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ConfigDumpResponse(_message.Message):
    __slots__ = ("version", "objects")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    version: int
    objects: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., objects: _Optional[_Iterable[str]] = ...) -> None: ...

class CertsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChainCertificate(_message.Message):
    __slots__ = ("subject", "issuer", "serial", "not_before", "not_after", "uris")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    URIS_FIELD_NUMBER: _ClassVar[int]
    subject: str
    issuer: str
    serial: str
    not_before: float
    not_after: float
    uris: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, subject: _Optional[str] = ..., issuer: _Optional[str] = ..., serial: _Optional[str] = ..., not_before: _Optional[float] = ..., not_after: _Optional[float] = ..., uris: _Optional[_Iterable[str]] = ...) -> None: ...

class Certificate(_message.Message):
    __slots__ = ("identity", "serial", "not_before", "not_after", "renews_in_seconds", "state", "last_error", "chain")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    RENEWS_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    identity: str
    serial: str
    not_before: float
    not_after: float
    renews_in_seconds: float
    state: str
    last_error: str
    chain: _containers.RepeatedCompositeFieldContainer[ChainCertificate]
    def __init__(self, identity: _Optional[str] = ..., serial: _Optional[str] = ..., not_before: _Optional[float] = ..., not_after: _Optional[float] = ..., renews_in_seconds: _Optional[float] = ..., state: _Optional[str] = ..., last_error: _Optional[str] = ..., chain: _Optional[_Iterable[_Union[ChainCertificate, _Mapping]]] = ...) -> None: ...

class CertsResponse(_message.Message):
    __slots__ = ("certificates", "ca")
    CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    CA_FIELD_NUMBER: _ClassVar[int]
    certificates: _containers.RepeatedCompositeFieldContainer[Certificate]
    ca: CaStatus
    def __init__(self, certificates: _Optional[_Iterable[_Union[Certificate, _Mapping]]] = ..., ca: _Optional[_Union[CaStatus, _Mapping]] = ...) -> None: ...

class RequestsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class Ejection(_message.Message):
    __slots__ = ("cluster", "endpoint", "returns_in_seconds")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    RETURNS_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    endpoint: str
    returns_in_seconds: float
    def __init__(self, cluster: _Optional[str] = ..., endpoint: _Optional[str] = ..., returns_in_seconds: _Optional[float] = ...) -> None: ...

class RequestsResponse(_message.Message):
    __slots__ = ("records", "ejected")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    EJECTED_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedScalarFieldContainer[str]
    ejected: _containers.RepeatedCompositeFieldContainer[Ejection]
    def __init__(self, records: _Optional[_Iterable[str]] = ..., ejected: _Optional[_Iterable[_Union[Ejection, _Mapping]]] = ...) -> None: ...

class MetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MetricsResponse(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("from_pod", "to", "method", "path", "headers", "jwt")
    FROM_POD_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    JWT_FIELD_NUMBER: _ClassVar[int]
    from_pod: str
    to: str
    method: str
    path: str
    headers: _containers.RepeatedScalarFieldContainer[str]
    jwt: str
    def __init__(self, from_pod: _Optional[str] = ..., to: _Optional[str] = ..., method: _Optional[str] = ..., path: _Optional[str] = ..., headers: _Optional[_Iterable[str]] = ..., jwt: _Optional[str] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class BpfRequest(_message.Message):
    __slots__ = ("bypass",)
    BYPASS_FIELD_NUMBER: _ClassVar[int]
    bypass: str
    def __init__(self, bypass: _Optional[str] = ...) -> None: ...

class BpfResponse(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class CniPod(_message.Message):
    __slots__ = ("namespace", "name", "uid", "container_id", "netns", "ips", "cgroup")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    NETNS_FIELD_NUMBER: _ClassVar[int]
    IPS_FIELD_NUMBER: _ClassVar[int]
    CGROUP_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    uid: str
    container_id: str
    netns: str
    ips: _containers.RepeatedScalarFieldContainer[str]
    cgroup: str
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., uid: _Optional[str] = ..., container_id: _Optional[str] = ..., netns: _Optional[str] = ..., ips: _Optional[_Iterable[str]] = ..., cgroup: _Optional[str] = ...) -> None: ...

class CniAddRequest(_message.Message):
    __slots__ = ("pod", "timeout_seconds")
    POD_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    pod: CniPod
    timeout_seconds: float
    def __init__(self, pod: _Optional[_Union[CniPod, _Mapping]] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class CniAddResponse(_message.Message):
    __slots__ = ("captured", "state", "mode")
    CAPTURED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    captured: bool
    state: str
    mode: str
    def __init__(self, captured: _Optional[bool] = ..., state: _Optional[str] = ..., mode: _Optional[str] = ...) -> None: ...

class CniDelRequest(_message.Message):
    __slots__ = ("pod",)
    POD_FIELD_NUMBER: _ClassVar[int]
    pod: CniPod
    def __init__(self, pod: _Optional[_Union[CniPod, _Mapping]] = ...) -> None: ...

class CniDelResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class CniCheckRequest(_message.Message):
    __slots__ = ("pod",)
    POD_FIELD_NUMBER: _ClassVar[int]
    pod: CniPod
    def __init__(self, pod: _Optional[_Union[CniPod, _Mapping]] = ...) -> None: ...

class CniCheckResponse(_message.Message):
    __slots__ = ("captured", "state", "mode")
    CAPTURED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    captured: bool
    state: str
    mode: str
    def __init__(self, captured: _Optional[bool] = ..., state: _Optional[str] = ..., mode: _Optional[str] = ...) -> None: ...
