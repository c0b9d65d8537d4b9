"""TLS settings both ends of a kmipd connection agree on."""

#: The one key-exchange group offered. OpenSSL 3 would also accept X448 and
#: secp521r1, which Mozilla's "modern" profile forbids (sslyze flags them), and
#: Python 3.11's ssl can only set a single group (set_ecdh_curve), not a list.
#: P-256 is the group every TLS 1.3 stack has, FIPS-validated ones included;
#: the client library offers it first, so no HelloRetryRequest round trip.
KEY_EXCHANGE_GROUP = "prime256v1"
