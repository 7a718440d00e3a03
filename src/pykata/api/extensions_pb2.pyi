from . import oci_pb2 as _oci_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CapabilitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Extension(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ExtensionLimits(_message.Message):
    __slots__ = ("max_message_bytes", "max_calls_per_connection", "max_connections", "window_bytes", "max_chunk_bytes", "max_forwards", "watch_queue_events", "watch_window_events", "max_watches", "max_watched_directories", "max_transfers", "max_execs")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CALLS_PER_CONNECTION_FIELD_NUMBER: _ClassVar[int]
    MAX_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_FORWARDS_FIELD_NUMBER: _ClassVar[int]
    WATCH_QUEUE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    WATCH_WINDOW_EVENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_WATCHES_FIELD_NUMBER: _ClassVar[int]
    MAX_WATCHED_DIRECTORIES_FIELD_NUMBER: _ClassVar[int]
    MAX_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    MAX_EXECS_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_calls_per_connection: int
    max_connections: int
    window_bytes: int
    max_chunk_bytes: int
    max_forwards: int
    watch_queue_events: int
    watch_window_events: int
    max_watches: int
    max_watched_directories: int
    max_transfers: int
    max_execs: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_calls_per_connection: _Optional[int] = ..., max_connections: _Optional[int] = ..., window_bytes: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., max_forwards: _Optional[int] = ..., watch_queue_events: _Optional[int] = ..., watch_window_events: _Optional[int] = ..., max_watches: _Optional[int] = ..., max_watched_directories: _Optional[int] = ..., max_transfers: _Optional[int] = ..., max_execs: _Optional[int] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("agent_version", "upstream_api_version", "extensions", "limits", "storage_drivers", "runtime")
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_API_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXTENSIONS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    STORAGE_DRIVERS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    upstream_api_version: str
    extensions: _containers.RepeatedCompositeFieldContainer[Extension]
    limits: ExtensionLimits
    storage_drivers: _containers.RepeatedScalarFieldContainer[str]
    runtime: str
    def __init__(self, agent_version: _Optional[str] = ..., upstream_api_version: _Optional[str] = ..., extensions: _Optional[_Iterable[_Union[Extension, _Mapping]]] = ..., limits: _Optional[_Union[ExtensionLimits, _Mapping]] = ..., storage_drivers: _Optional[_Iterable[str]] = ..., runtime: _Optional[str] = ...) -> None: ...

class ForwardTarget(_message.Message):
    __slots__ = ("host", "port", "unix_socket")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    UNIX_SOCKET_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    unix_socket: FileLocation
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ..., unix_socket: _Optional[_Union[FileLocation, _Mapping]] = ...) -> None: ...

class ForwardMessage(_message.Message):
    __slots__ = ("open", "opened", "data", "eof", "ack")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    open: ForwardTarget
    opened: bool
    data: bytes
    eof: bool
    ack: int
    def __init__(self, open: _Optional[_Union[ForwardTarget, _Mapping]] = ..., opened: _Optional[bool] = ..., data: _Optional[bytes] = ..., eof: _Optional[bool] = ..., ack: _Optional[int] = ...) -> None: ...

class FileLocation(_message.Message):
    __slots__ = ("container_id", "path")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    path: str
    def __init__(self, container_id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class UploadOpen(_message.Message):
    __slots__ = ("file", "size", "mode", "uid", "gid", "resume")
    FILE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    file: FileLocation
    size: int
    mode: int
    uid: int
    gid: int
    resume: bool
    def __init__(self, file: _Optional[_Union[FileLocation, _Mapping]] = ..., size: _Optional[int] = ..., mode: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., resume: _Optional[bool] = ...) -> None: ...

class UploadInput(_message.Message):
    __slots__ = ("open", "data", "sha256")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    open: UploadOpen
    data: bytes
    sha256: bytes
    def __init__(self, open: _Optional[_Union[UploadOpen, _Mapping]] = ..., data: _Optional[bytes] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class UploadOutput(_message.Message):
    __slots__ = ("ready", "offset", "ack", "committed", "sha256")
    READY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    offset: int
    ack: int
    committed: bool
    sha256: bytes
    def __init__(self, ready: _Optional[bool] = ..., offset: _Optional[int] = ..., ack: _Optional[int] = ..., committed: _Optional[bool] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class DownloadOpen(_message.Message):
    __slots__ = ("file", "offset")
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    file: FileLocation
    offset: int
    def __init__(self, file: _Optional[_Union[FileLocation, _Mapping]] = ..., offset: _Optional[int] = ...) -> None: ...

class DownloadInput(_message.Message):
    __slots__ = ("open", "ack")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    open: DownloadOpen
    ack: int
    def __init__(self, open: _Optional[_Union[DownloadOpen, _Mapping]] = ..., ack: _Optional[int] = ...) -> None: ...

class DownloadOutput(_message.Message):
    __slots__ = ("ready", "size", "mode", "data", "sha256")
    READY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    size: int
    mode: int
    data: bytes
    sha256: bytes
    def __init__(self, ready: _Optional[bool] = ..., size: _Optional[int] = ..., mode: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class ExecStart(_message.Message):
    __slots__ = ("container_id", "exec_id", "process")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    process: _oci_pb2.Process
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., process: _Optional[_Union[_oci_pb2.Process, _Mapping]] = ...) -> None: ...

class WindowSize(_message.Message):
    __slots__ = ("rows", "columns")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    columns: int
    def __init__(self, rows: _Optional[int] = ..., columns: _Optional[int] = ...) -> None: ...

class ExecInput(_message.Message):
    __slots__ = ("start", "stdin", "stdin_eof", "resize", "signal", "ack")
    START_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    STDIN_EOF_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    start: ExecStart
    stdin: bytes
    stdin_eof: bool
    resize: WindowSize
    signal: int
    ack: int
    def __init__(self, start: _Optional[_Union[ExecStart, _Mapping]] = ..., stdin: _Optional[bytes] = ..., stdin_eof: _Optional[bool] = ..., resize: _Optional[_Union[WindowSize, _Mapping]] = ..., signal: _Optional[int] = ..., ack: _Optional[int] = ...) -> None: ...

class ExecOutput(_message.Message):
    __slots__ = ("exec_id", "stdout", "stderr", "stdin_ack", "exited", "exit_status")
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    STDIN_ACK_FIELD_NUMBER: _ClassVar[int]
    EXITED_FIELD_NUMBER: _ClassVar[int]
    EXIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    exec_id: str
    stdout: bytes
    stderr: bytes
    stdin_ack: int
    exited: bool
    exit_status: int
    def __init__(self, exec_id: _Optional[str] = ..., stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., stdin_ack: _Optional[int] = ..., exited: _Optional[bool] = ..., exit_status: _Optional[int] = ...) -> None: ...

class WatchOpen(_message.Message):
    __slots__ = ("location", "recursive")
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    RECURSIVE_FIELD_NUMBER: _ClassVar[int]
    location: FileLocation
    recursive: bool
    def __init__(self, location: _Optional[_Union[FileLocation, _Mapping]] = ..., recursive: _Optional[bool] = ...) -> None: ...

class WatchInput(_message.Message):
    __slots__ = ("open", "ack")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    open: WatchOpen
    ack: int
    def __init__(self, open: _Optional[_Union[WatchOpen, _Mapping]] = ..., ack: _Optional[int] = ...) -> None: ...

class FileEvent(_message.Message):
    __slots__ = ("kind", "path", "old_path", "is_dir")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[FileEvent.Kind]
        CREATE: _ClassVar[FileEvent.Kind]
        MODIFY: _ClassVar[FileEvent.Kind]
        DELETE: _ClassVar[FileEvent.Kind]
        RENAME: _ClassVar[FileEvent.Kind]
        ATTRIB: _ClassVar[FileEvent.Kind]
    UNKNOWN: FileEvent.Kind
    CREATE: FileEvent.Kind
    MODIFY: FileEvent.Kind
    DELETE: FileEvent.Kind
    RENAME: FileEvent.Kind
    ATTRIB: FileEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OLD_PATH_FIELD_NUMBER: _ClassVar[int]
    IS_DIR_FIELD_NUMBER: _ClassVar[int]
    kind: FileEvent.Kind
    path: str
    old_path: str
    is_dir: bool
    def __init__(self, kind: _Optional[_Union[FileEvent.Kind, str]] = ..., path: _Optional[str] = ..., old_path: _Optional[str] = ..., is_dir: _Optional[bool] = ...) -> None: ...

class WatchOutput(_message.Message):
    __slots__ = ("ready", "events", "lost")
    READY_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    events: _containers.RepeatedCompositeFieldContainer[FileEvent]
    lost: int
    def __init__(self, ready: _Optional[bool] = ..., events: _Optional[_Iterable[_Union[FileEvent, _Mapping]]] = ..., lost: _Optional[int] = ...) -> None: ...
