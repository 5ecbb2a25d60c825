"""Swagger UI renders in a real browser from the process's own assets."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import Shot

pytestmark = [pytest.mark.browser, pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.slow]


def test_swagger_ui_renders_the_operations_without_other_origins(page: Page, shot: Shot) -> None:
    response = page.goto("/swagger")
    assert response is not None
    assert response.status == 200
    operation = page.locator(".opblock-summary-path[data-path='/api/tasks']").first
    expect(operation).to_be_visible()
    shot(page, "swagger")
