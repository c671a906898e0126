"""The Prometheus configuration and alert rules, checked by Prometheus's own promtool."""
from __future__ import annotations

from pathlib import Path

from tests.deploy.support import PROMETHEUS_DIR, make_test_config, run


def test_the_scrape_configuration_passes_promtool_check_config(promtool: str) -> None:
    # Given the project's prometheus.yml (which loads alerts.yml)
    # When promtool checks it
    done = run([promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")])
    # Then it is valid, rule file included
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout


def test_the_test_copy_of_the_configuration_is_valid_too(promtool: str, tmp_path: Path) -> None:
    # Given the copy the monitoring test runs Prometheus with
    config = make_test_config(tmp_path)
    # When promtool checks it
    done = run([promtool, "check", "config", str(config)])
    # Then it is valid
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_alert_rules_pass_promtool_check_rules(promtool: str) -> None:
    # Given alerts.yml
    # When promtool checks it
    done = run([promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")])
    # Then every rule parses
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_rule_unit_tests_show_the_silent_client_alert_firing(promtool: str) -> None:
    # Given alerts_test.yml: a worker stops progressing while its endpoint still answers,
    # plus NaN loss, dead letters, a memory alarm and a growing backlog
    tests = PROMETHEUS_DIR / "alerts_test.yml"
    assert "alertname: SplitmqClientSilent" in tests.read_text()
    # When promtool runs them
    done = run([promtool, "test", "rules", str(tests)])
    # Then all expectations hold, including SplitmqClientSilent firing for that worker only
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_the_issue_asks_for_exists() -> None:
    # Given the alert names in alerts.yml
    import yaml

    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    # Then a silent client, dead letters, backlog, broker alarms and NaN loss are all covered
    assert {"SplitmqClientSilent", "SplitmqMessagesRejected", "SplitmqDeadLetterQueueGrowing",
            "SplitmqQueueBacklogGrowing", "RabbitmqMemoryAlarm", "RabbitmqDiskAlarm",
            "SplitmqLossNotFinite"} <= names
