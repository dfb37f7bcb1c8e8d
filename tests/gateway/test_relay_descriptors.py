"""The one-task relay's extra descriptor never starves accept() (issue 17): the gateway uses it only
when max_connections sessions of three descriptors each fit the open-files limit."""

from __future__ import annotations

import resource

from gateway.proxy import Gateway
from tests.gateway.test_proxy_unit import make_config


def test_one_task_relay_only_when_three_descriptors_per_session_fit():
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert Gateway(make_config(limits={"max_connections": 10})).one_task_relay
    if soft != resource.RLIM_INFINITY:
        # Two descriptors per session fit, three do not: keep the two-pump splice.
        assert not Gateway(make_config(limits={"max_connections": soft // 2 - 200})).one_task_relay
