"""Run by the Python of sslyze's own virtual environment, not imported by the suite.

sslyze pins an older cryptography than kmipd, so it lives in a virtual
environment of its own and this script is its only contact with the suite:
it scans one server with client credentials, checks the result against
Mozilla's "modern" profile with sslyze's own checker, and prints one JSON
object on stdout:

    {"issues": {criterion: text}, "accepted": {...}, "curves": [...], "error": text|null}

Usage: python _sslyze_scan.py HOST PORT CA CERT KEY [modern|intermediate]
"""

import ipaddress
import json
import sys
from pathlib import Path
from typing import Any


def main() -> None:
    host, port, ca, cert, key = sys.argv[1:6]
    judged_as = sys.argv[6] if len(sys.argv) > 6 else "modern"
    from sslyze import (  # noqa: PLC0415 (imported only where sslyze is installed)
        CertificateInfoExtraArgument,
        ClientAuthenticationCredentials,
        ScanCommandsExtraArguments,
        Scanner,
        ServerNetworkConfiguration,
        ServerNetworkLocation,
        ServerScanRequest,
        ServerScanStatusEnum,
    )
    from sslyze.mozilla_tls_profile.tls_config_checker import (  # noqa: PLC0415
        SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
        MozillaTlsConfiguration,
        ServerNotCompliantWithTlsConfiguration,
        ServerScanResultIncomplete,
        TlsConfigurationEnum,
        check_server_against_tls_configuration,
    )

    request = ServerScanRequest(
        server_location=ServerNetworkLocation(hostname=host, port=int(port), ip_address=_ip(host)),
        network_configuration=ServerNetworkConfiguration(
            tls_server_name_indication=host,
            tls_client_auth_credentials=ClientAuthenticationCredentials(
                certificate_chain_path=Path(cert), key_path=Path(key)
            ),
        ),
        scan_commands=SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=Path(ca))
        ),
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    [result] = list(scanner.get_results())
    report: dict[str, Any] = {"issues": {}, "accepted": {}, "curves": [], "error": None}
    if result.scan_status != ServerScanStatusEnum.COMPLETED or result.scan_result is None:
        report["error"] = f"scan {result.scan_status.name}: {result.connectivity_error_trace}"
        print(json.dumps(report))
        return
    scan = result.scan_result
    for name in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2", "tls_1_3"):
        attempt = getattr(scan, f"{name}_cipher_suites")
        if attempt.result is not None and attempt.result.accepted_cipher_suites:
            report["accepted"][name] = [
                s.cipher_suite.name for s in attempt.result.accepted_cipher_suites
            ]
    if scan.elliptic_curves.result is not None:
        report["curves"] = [c.name for c in scan.elliptic_curves.result.supported_curves or []]
    profile = MozillaTlsConfiguration.get(
        TlsConfigurationEnum.MOZILLA_INTERMEDIATE
        if judged_as == "intermediate"
        else TlsConfigurationEnum.MOZILLA_MODERN
    )
    try:
        check_server_against_tls_configuration(result, profile)
    except ServerNotCompliantWithTlsConfiguration as exc:
        report["issues"] = dict(exc.issues)
    except ServerScanResultIncomplete as exc:
        report["error"] = f"scan incomplete: {exc}"
    print(json.dumps(report))


def _ip(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None  # a DNS name: sslyze resolves it


if __name__ == "__main__":
    main()
