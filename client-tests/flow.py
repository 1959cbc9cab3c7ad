"""The main flow of the API through a client generated from its OpenAPI document.

Run by scripts/client-test, which generates the client (package `aichat_client`) from the
document this API serves and starts the stack. Every call goes through the generated client;
an httpx hook on its connection checks each real request and response against the document
with openapi-core: a status or body the document does not describe, or a documented header
or parameter that does not match it, fails the run.

Environment: AICHAT_BASE_URL (the API), SCHEMA_FILE (the document, as downloaded); the
generated package on PYTHONPATH.
"""

import json
import os
import secrets
from http import HTTPStatus

import httpx
from aichat_client import AuthenticatedClient, Client
from aichat_client.api.ai import (
    activate_message,
    create_ai_chat,
    edit_message,
    export_ai_chat,
    get_ai_chat,
    import_ai_chat,
    list_ai_chat_messages,
    quota,
    regenerate_message,
    send_message,
    usage,
)
from aichat_client.api.auth import login, logout, me, register
from aichat_client.api.chats import create_chat, send_chat_message
from aichat_client.models import (
    AiChat,
    AiChatRequest,
    AiMessage,
    Chat,
    ChatMessage,
    ChatExport,
    ChatMessageRequest,
    CreateChatRequest,
    EditMessageRequest,
    ErrorBody,
    FieldErrorsBody,
    LoginRequest,
    LoginResponse,
    MessageResponse,
    Quota,
    RegisterRequest,
    SendMessageRequest,
    Usage,
    User,
)
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from werkzeug.datastructures import Headers, ImmutableMultiDict

BASE_URL = os.environ["AICHAT_BASE_URL"]
with open(os.environ["SCHEMA_FILE"], encoding="utf-8") as f:
    DOCUMENT = OpenAPI.from_dict(json.load(f))


class OpenAPIRequest:
    """An httpx request as openapi-core reads one (its `Request` protocol)."""

    def __init__(self, request: httpx.Request):
        self.request = request
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(request.url.params.multi_items()),
            header=Headers(list(request.headers.multi_items())),
            cookie=ImmutableMultiDict(cookies_of(request)),
        )

    @property
    def host_url(self) -> str:
        return f"{self.request.url.scheme}://{self.request.url.netloc.decode()}"

    @property
    def path(self) -> str:
        return self.request.url.path

    @property
    def method(self) -> str:
        return self.request.method.lower()

    @property
    def body(self) -> bytes | None:
        return self.request.content or None

    @property
    def content_type(self) -> str:
        return self.request.headers.get("content-type", "")


class OpenAPIResponse:
    """An httpx response as openapi-core reads one (its `Response` protocol)."""

    def __init__(self, response: httpx.Response):
        self.response = response

    @property
    def data(self) -> bytes:
        return self.response.content

    @property
    def status_code(self) -> int:
        return self.response.status_code

    @property
    def content_type(self) -> str:
        return self.response.headers.get("content-type", "")

    @property
    def headers(self) -> Headers:
        return Headers(list(self.response.headers.multi_items()))


def cookies_of(request: httpx.Request) -> dict[str, str]:
    cookies = {}
    for header in request.headers.get_list("cookie"):
        for pair in header.split(";"):
            name, _, value = pair.strip().partition("=")
            if name:
                cookies[name] = value
    return cookies


checked: list[str] = []


def check_against_document(response: httpx.Response) -> None:
    """httpx response hook: the request and its response must be as the document says."""
    response.read()
    request = OpenAPIRequest(response.request)
    what = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
    request_result = DOCUMENT.unmarshal_request(request)
    if request_result.errors:
        fail(f"{what}: the request does not match the document", request_result.errors)
    response_result = DOCUMENT.unmarshal_response(request, OpenAPIResponse(response))
    if response_result.errors:
        fail(
            f"{what}: the response does not match the document (body: {response.text[:500]!r})",
            response_result.errors,
        )
    checked.append(what)


def fail(message: str, errors: list) -> None:
    details = "; ".join(f"{e!r} (cause: {e.__cause__!r})" for e in errors)
    raise AssertionError(f"{message}: {details}")


def expect(response, status: HTTPStatus, kind):
    """The parsed body of `response`, which must have `status` and parse as `kind`."""
    assert response.status_code == status, (
        f"expected {status}, got {response.status_code}: {response.content[:500]!r}"
    )
    assert isinstance(response.parsed, kind), (
        f"expected a {kind.__name__}, got {response.parsed!r}"
    )
    return response.parsed


def hooks() -> dict:
    return {"event_hooks": {"response": [check_against_document]}}


def main() -> None:
    anonymous = Client(
        base_url=BASE_URL, httpx_args=hooks(), raise_on_unexpected_status=True
    )
    username = f"client_{secrets.token_hex(4)}"
    password = f"correct horse {secrets.token_hex(4)}"

    refused = register.sync_detailed(
        client=anonymous,
        body=RegisterRequest(
            username=username, password=password, password_confirm="other"
        ),
    )
    problems = expect(refused, HTTPStatus.BAD_REQUEST, FieldErrorsBody)
    assert "password" in problems or "password_confirm" in problems, problems

    user = expect(
        register.sync_detailed(
            client=anonymous,
            body=RegisterRequest(
                username=username, password=password, password_confirm=password
            ),
        ),
        HTTPStatus.CREATED,
        User,
    )
    assert user.username == username, user

    session = expect(
        login.sync_detailed(
            client=anonymous, body=LoginRequest(username=username, password=password)
        ),
        HTTPStatus.OK,
        LoginResponse,
    )
    assert session.id == user.id and session.token, session
    client = AuthenticatedClient(
        base_url=BASE_URL,
        token=session.token,
        httpx_args=hooks(),
        raise_on_unexpected_status=True,
    )
    assert expect(me.sync_detailed(client=client), HTTPStatus.OK, User).id == user.id

    chat = expect(
        create_chat.sync_detailed(
            client=client, body=CreateChatRequest(name="Trip planning")
        ),
        HTTPStatus.CREATED,
        Chat,
    )
    expect(
        send_chat_message.sync_detailed(
            chat.id,
            client=client,
            body=ChatMessageRequest(content="We leave on Friday."),
        ),
        HTTPStatus.CREATED,
        ChatMessage,
    )
    ai_chat = expect(
        create_ai_chat.sync_detailed(
            client=client,
            body=AiChatRequest(title="Packing list", related_chat=chat.id),
        ),
        HTTPStatus.CREATED,
        AiChat,
    )
    assert ai_chat.related_chat == chat.id, ai_chat

    reply = expect(
        send_message.sync_detailed(
            ai_chat.id,
            client=client,
            body=SendMessageRequest(
                content="What should I pack?", include_related_chat_context=True
            ),
            wait="true",
        ),
        HTTPStatus.OK,
        AiMessage,
    )
    assert reply.role == "assistant" and reply.content, reply

    messages = expect(
        list_ai_chat_messages.sync_detailed(ai_chat.id, client=client),
        HTTPStatus.OK,
        list,
    )
    assert [m.role for m in messages] == ["user", "assistant"], messages
    assert (
        messages[0].content == "What should I pack?"
        and messages[0].status == "answered"
    )
    assert messages[1].id == reply.id and messages[1].reply_to == messages[0].id, (
        messages
    )

    totals = expect(usage.sync_detailed(client=client), HTTPStatus.OK, Usage)
    assert totals.total.message_count == 1 and totals.total.total_tokens > 0, totals

    limits = expect(quota.sync_detailed(client=client), HTTPStatus.OK, Quota)
    assert limits.daily.reserved == 0, limits
    assert limits.send_rate.limit is None or limits.send_rate.remaining < limits.send_rate.limit, (
        limits
    )

    missing = get_ai_chat.sync_detailed(ai_chat.id + 1_000_000, client=client)
    expect(missing, HTTPStatus.NOT_FOUND, ErrorBody)

    # Versions: a regenerated reply, an edited question, a switch back, and the tree.
    again = expect(
        regenerate_message.sync_detailed(reply.id, client=client, wait="true"),
        HTTPStatus.OK,
        AiMessage,
    )
    assert again.version == 2 and again.reply_to == messages[0].id, again
    edited = expect(
        edit_message.sync_detailed(
            messages[0].id,
            client=client,
            body=EditMessageRequest(content="What should I pack for rain?"),
            wait="true",
        ),
        HTTPStatus.OK,
        AiMessage,
    )
    assert edited.role == "assistant" and edited.active, edited
    back = expect(
        activate_message.sync_detailed(reply.id, client=client),
        HTTPStatus.OK,
        AiMessage,
    )
    assert back.active, back
    tree = expect(
        list_ai_chat_messages.sync_detailed(ai_chat.id, client=client, all_=True),
        HTTPStatus.OK,
        list,
    )
    assert len(tree) == 5 and [m.id for m in tree if m.active] == [
        messages[0].id,
        reply.id,
    ], tree

    # Export and import: the copy holds the same tree.
    export = expect(
        export_ai_chat.sync_detailed(ai_chat.id, client=client, all_=True),
        HTTPStatus.OK,
        ChatExport,
    )
    assert len(export.messages) == 5, export
    copy = expect(
        import_ai_chat.sync_detailed(client=client, body=export),
        HTTPStatus.CREATED,
        AiChat,
    )
    assert copy.id != ai_chat.id and copy.message_count == 2, copy

    expect(logout.sync_detailed(client=client), HTTPStatus.OK, MessageResponse)
    expect(me.sync_detailed(client=client), HTTPStatus.UNAUTHORIZED, ErrorBody)

    print(f"client-test: {len(checked)} requests and responses match the document:")
    for what in checked:
        print(f"  {what}")


if __name__ == "__main__":
    main()
