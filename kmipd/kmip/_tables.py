"""KMIP tag numbers and enumerations, as data (KMIP 1.0-2.0, the specification's tables).

Why it is long: it is the specification's tables, as data.

The names are the specification's, written as in its XML/JSON encodings
(``ActivationDate``); ``TAGS`` and ``ENUMS`` are built from the text below at
import, so adding a tag is adding a line.
"""

from __future__ import annotations

from typing import Final

_TAG_TABLE = """
420001 ActivationDate
420002 ApplicationData
420003 ApplicationNamespace
420004 ApplicationSpecificInformation
420005 ArchiveDate
420006 AsynchronousCorrelationValue
420007 AsynchronousIndicator
420008 Attribute
420009 AttributeIndex
42000A AttributeName
42000B AttributeValue
42000C Authentication
42000D BatchCount
42000E BatchErrorContinuationOption
42000F BatchItem
420010 BatchOrderOption
420011 BlockCipherMode
420012 CancellationResult
420013 Certificate
420014 CertificateIdentifier
420015 CertificateIssuer
420016 CertificateIssuerAlternativeName
420017 CertificateIssuerDistinguishedName
420018 CertificateRequest
420019 CertificateRequestType
42001A CertificateSubject
42001B CertificateSubjectAlternativeName
42001C CertificateSubjectDistinguishedName
42001D CertificateType
42001E CertificateValue
42001F CommonTemplateAttribute
420020 CompromiseDate
420021 CompromiseOccurrenceDate
420022 ContactInformation
420023 Credential
420024 CredentialType
420025 CredentialValue
420026 CriticalityIndicator
420027 CrtCoefficient
420028 CryptographicAlgorithm
420029 CryptographicDomainParameters
42002A CryptographicLength
42002B CryptographicParameters
42002C CryptographicUsageMask
42002D CustomAttribute
42002E D
42002F DeactivationDate
420030 DerivationData
420031 DerivationMethod
420032 DerivationParameters
420033 DestroyDate
420034 Digest
420035 DigestValue
420036 EncryptionKeyInformation
420037 G
420038 HashingAlgorithm
420039 InitialDate
42003A InitializationVector
42003B Issuer
42003C IterationCount
42003D IvCounterNonce
42003E J
42003F Key
420040 KeyBlock
420041 KeyCompressionType
420042 KeyFormatType
420043 KeyMaterial
420044 KeyPartIdentifier
420045 KeyValue
420046 KeyWrappingData
420047 KeyWrappingSpecification
420048 LastChangeDate
420049 LeaseTime
42004A Link
42004B LinkType
42004C LinkedObjectIdentifier
42004D MacSignature
42004E MacSignatureKeyInformation
42004F MaximumItems
420050 MaximumResponseSize
420051 MessageExtension
420052 Modulus
420053 Name
420054 NameType
420055 NameValue
420056 ObjectGroup
420057 ObjectType
420058 Offset
420059 OpaqueDataType
42005A OpaqueDataValue
42005B OpaqueObject
42005C Operation
42005D OperationPolicyName
42005E P
42005F PaddingMethod
420060 PrimeExponentP
420061 PrimeExponentQ
420062 PrimeFieldSize
420063 PrivateExponent
420064 PrivateKey
420065 PrivateKeyTemplateAttribute
420066 PrivateKeyUniqueIdentifier
420067 ProcessStartDate
420068 ProtectStopDate
420069 ProtocolVersion
42006A ProtocolVersionMajor
42006B ProtocolVersionMinor
42006C PublicExponent
42006D PublicKey
42006E PublicKeyTemplateAttribute
42006F PublicKeyUniqueIdentifier
420070 PutFunction
420071 Q
420072 QString
420073 Qlength
420074 QueryFunction
420075 RecommendedCurve
420076 ReplacedUniqueIdentifier
420077 RequestHeader
420078 RequestMessage
420079 RequestPayload
42007A ResponseHeader
42007B ResponseMessage
42007C ResponsePayload
42007D ResultMessage
42007E ResultReason
42007F ResultStatus
420080 RevocationMessage
420081 RevocationReason
420082 RevocationReasonCode
420083 KeyRoleType
420084 Salt
420085 SecretData
420086 SecretDataType
420087 SerialNumber
420088 ServerInformation
420089 SplitKey
42008A SplitKeyMethod
42008B SplitKeyParts
42008C SplitKeyThreshold
42008D State
42008E StorageStatusMask
42008F SymmetricKey
420090 Template
420091 TemplateAttribute
420092 TimeStamp
420093 UniqueBatchItemId
420094 UniqueIdentifier
420095 UsageLimits
420096 UsageLimitsCount
420097 UsageLimitsTotal
420098 UsageLimitsUnit
420099 Username
42009A ValidityDate
42009B ValidityIndicator
42009C VendorExtension
42009D VendorIdentification
42009E WrappingMethod
42009F X
4200A0 Y
4200A1 Password
4200A2 DeviceIdentifier
4200A3 EncodingOption
4200A4 ExtensionInformation
4200A5 ExtensionName
4200A6 ExtensionTag
4200A7 ExtensionType
4200A8 Fresh
4200A9 MachineIdentifier
4200AA MediaIdentifier
4200AB NetworkIdentifier
4200AC ObjectGroupMember
4200AD CertificateLength
4200AE DigitalSignatureAlgorithm
4200AF CertificateSerialNumber
4200B0 DeviceSerialNumber
4200B1 IssuerAlternativeName
4200B2 IssuerDistinguishedName
4200B3 SubjectAlternativeName
4200B4 SubjectDistinguishedName
4200B5 X509CertificateIdentifier
4200B6 X509CertificateIssuer
4200B7 X509CertificateSubject
4200B8 KeyValueLocation
4200B9 KeyValueLocationValue
4200BA KeyValueLocationType
4200BB KeyValuePresent
4200BC OriginalCreationDate
4200BD PgpKey
4200BE PgpKeyVersion
4200BF AlternativeName
4200C0 AlternativeNameValue
4200C1 AlternativeNameType
4200C2 Data
4200C3 SignatureData
4200C4 DataLength
4200C5 RandomIv
4200C6 MacData
4200C7 AttestationType
4200C8 Nonce
4200C9 NonceId
4200CA NonceValue
4200CB AttestationMeasurement
4200CC AttestationAssertion
4200CD IvLength
4200CE TagLength
4200CF FixedFieldLength
4200D0 CounterLength
4200D1 InitialCounterValue
4200D2 InvocationFieldLength
4200D3 AttestationCapableIndicator
4200D4 OffsetItems
4200D5 LocatedItems
4200D6 CorrelationValue
4200D7 InitIndicator
4200D8 FinalIndicator
4200D9 RngParameters
4200DA RngAlgorithm
4200DB DrbgAlgorithm
4200DC Fips186Variation
4200DD PredictionResistance
4200DE RandomNumberGenerator
4200DF ValidationInformation
4200E0 ValidationAuthorityType
4200E1 ValidationAuthorityCountry
4200E2 ValidationAuthorityUri
4200E3 ValidationVersionMajor
4200E4 ValidationVersionMinor
4200E5 ValidationType
4200E6 ValidationLevel
4200E7 ValidationCertificateIdentifier
4200E8 ValidationCertificateUri
4200E9 ValidationVendorUri
4200EA ValidationProfile
4200EB ProfileInformation
4200EC ProfileName
4200ED ServerUri
4200EE ServerPort
4200EF StreamingCapability
4200F0 AsynchronousCapability
4200F1 AttestationCapability
4200F2 UnwrapMode
4200F3 DestroyAction
4200F4 ShreddingAlgorithm
4200F5 RngMode
4200F6 ClientRegistrationMethod
4200F7 CapabilityInformation
4200F8 KeyWrapType
4200F9 BatchUndoCapability
4200FA BatchContinueCapability
4200FB Pkcs12FriendlyName
4200FC Description
4200FD Comment
4200FE AuthenticatedEncryptionAdditionalData
4200FF AuthenticatedEncryptionTag
420100 SaltLength
420101 MaskGenerator
420102 MaskGeneratorHashingAlgorithm
420103 PSource
420104 TrailerField
420105 ClientCorrelationValue
420106 ServerCorrelationValue
420107 DigestedData
420108 CertificateSubjectCn
420109 CertificateSubjectO
42010A CertificateSubjectOu
42010B CertificateSubjectEmail
42010C CertificateSubjectC
42010D CertificateSubjectSt
42010E CertificateSubjectL
42010F CertificateSubjectUid
420110 CertificateSubjectSerialNumber
420111 CertificateSubjectTitle
420112 CertificateSubjectDc
420113 CertificateSubjectDnQualifier
420114 CertificateIssuerCn
420115 CertificateIssuerO
420116 CertificateIssuerOu
420117 CertificateIssuerEmail
420118 CertificateIssuerC
420119 CertificateIssuerSt
42011A CertificateIssuerL
42011B CertificateIssuerUid
42011C CertificateIssuerSerialNumber
42011D CertificateIssuerTitle
42011E CertificateIssuerDc
42011F CertificateIssuerDnQualifier
420120 Sensitive
420121 AlwaysSensitive
420122 Extractable
420123 NeverExtractable
420124 ReplaceExisting
420125 Attributes
420126 CommonAttributes
420127 PrivateKeyAttributes
420128 PublicKeyAttributes
420129 ExtensionEnumeration
42012A ExtensionAttribute
42012B ExtensionParentStructureTag
42012C ExtensionDescription
42012D ServerName
42012E ServerSerialNumber
42012F ServerVersion
420130 ServerLoad
420131 ProductName
420132 BuildLevel
420133 BuildDate
420134 ClusterInfo
420135 AlternateFailoverEndpoints
420136 ShortUniqueIdentifier
420137 Reserved
420138 Tag
420139 CertificateRequestUniqueIdentifier
42013A NistKeyType
42013B AttributeReference
42013C CurrentAttribute
42013D NewAttribute
420140 CertificateRequestValue
420141 LogMessage
420142 ProfileVersion
420143 ProfileVersionMajor
420144 ProfileVersionMinor
420145 ProtectionLevel
420146 ProtectionPeriod
420147 QuantumSafe
420148 QuantumSafeCapability
420149 Ticket
42014A TicketType
42014B TicketValue
42014C RequestCount
42014D Rights
42014E Objects
42014F Operations
420150 Right
420151 EndpointRole
420152 DefaultsInformation
420153 ObjectDefaults
420154 Ephemeral
420155 ServerHashedPassword
420156 OneTimePassword
420157 HashedPassword
420158 AdjustmentType
420159 Pkcs11Interface
42015A Pkcs11Function
42015B Pkcs11InputParameters
42015C Pkcs11OutputParameters
42015D Pkcs11ReturnCode
42015E ProtectionStorageMask
42015F ProtectionStorageMasks
420160 InteropFunction
420161 InteropIdentifier
420162 AdjustmentValue
420163 CommonProtectionStorageMasks
420164 PrivateProtectionStorageMasks
420165 PublicProtectionStorageMasks
"""

#: enumeration, value name, number
_ENUM_TABLE = """
ObjectType Certificate 0x1
ObjectType SymmetricKey 0x2
ObjectType PublicKey 0x3
ObjectType PrivateKey 0x4
ObjectType SplitKey 0x5
ObjectType Template 0x6
ObjectType SecretData 0x7
ObjectType OpaqueData 0x8
ObjectType PgpKey 0x9
ObjectType CertificateRequest 0xa
Operation Create 0x1
Operation CreateKeyPair 0x2
Operation Register 0x3
Operation ReKey 0x4
Operation DeriveKey 0x5
Operation Certify 0x6
Operation Recertify 0x7
Operation Locate 0x8
Operation Check 0x9
Operation Get 0xa
Operation GetAttributes 0xb
Operation GetAttributeList 0xc
Operation AddAttribute 0xd
Operation ModifyAttribute 0xe
Operation DeleteAttribute 0xf
Operation ObtainLease 0x10
Operation GetUsageAllocation 0x11
Operation Activate 0x12
Operation Revoke 0x13
Operation Destroy 0x14
Operation Archive 0x15
Operation Recover 0x16
Operation Validate 0x17
Operation Query 0x18
Operation Cancel 0x19
Operation Poll 0x1a
Operation Notify 0x1b
Operation Put 0x1c
Operation ReKeyKeyPair 0x1d
Operation DiscoverVersions 0x1e
Operation Encrypt 0x1f
Operation Decrypt 0x20
Operation Sign 0x21
Operation SignatureVerify 0x22
Operation Mac 0x23
Operation MacVerify 0x24
Operation RngRetrieve 0x25
Operation RngSeed 0x26
Operation Hash 0x27
Operation CreateSplitKey 0x28
Operation JoinSplitKey 0x29
Operation Import 0x2a
Operation Export 0x2b
Operation Log 0x2c
Operation Login 0x2d
Operation Logout 0x2e
Operation DelegatedLogin 0x2f
Operation AdjustAttribute 0x30
Operation SetAttribute 0x31
Operation SetEndpointRole 0x32
Operation Pkcs11 0x33
Operation Interop 0x34
Operation Reprovision 0x35
ResultStatus Success 0x0
ResultStatus OperationFailed 0x1
ResultStatus OperationPending 0x2
ResultStatus OperationUndone 0x3
ResultReason ItemNotFound 0x1
ResultReason ResponseTooLarge 0x2
ResultReason AuthenticationNotSuccessful 0x3
ResultReason InvalidMessage 0x4
ResultReason OperationNotSupported 0x5
ResultReason MissingData 0x6
ResultReason InvalidField 0x7
ResultReason FeatureNotSupported 0x8
ResultReason OperationCanceledByRequester 0x9
ResultReason CryptographicFailure 0xa
ResultReason IllegalOperation 0xb
ResultReason PermissionDenied 0xc
ResultReason ObjectArchived 0xd
ResultReason IndexOutOfBounds 0xe
ResultReason ApplicationNamespaceNotSupported 0xf
ResultReason KeyFormatTypeNotSupported 0x10
ResultReason KeyCompressionTypeNotSupported 0x11
ResultReason EncodingOptionError 0x12
ResultReason KeyValueNotPresent 0x13
ResultReason AttestationRequired 0x14
ResultReason AttestationFailed 0x15
ResultReason Sensitive 0x16
ResultReason NotExtractable 0x17
ResultReason ObjectAlreadyExists 0x18
ResultReason GeneralFailure 0x100
ResultReason InvalidTicket 0x19
ResultReason UsageLimitExceeded 0x1a
ResultReason NumericRange 0x1b
ResultReason InvalidDataType 0x1c
ResultReason ReadOnlyAttribute 0x1d
ResultReason MultiValuedAttribute 0x1e
ResultReason UnsupportedAttribute 0x1f
ResultReason AttributeInstanceNotFound 0x20
ResultReason AttributeNotFound 0x21
ResultReason AttributeReadOnly 0x22
ResultReason AttributeSingleValued 0x23
ResultReason BadCryptographicParameters 0x24
ResultReason BadPassword 0x25
ResultReason CodecError 0x26
ResultReason IllegalObjectType 0x28
ResultReason IncompatibleCryptographicUsageMask 0x29
ResultReason InternalServerError 0x2a
ResultReason InvalidAsynchronousCorrelationValue 0x2b
ResultReason InvalidAttribute 0x2c
ResultReason InvalidAttributeValue 0x2d
ResultReason InvalidCorrelationValue 0x2e
ResultReason InvalidCsr 0x2f
ResultReason InvalidObjectType 0x30
ResultReason KeyWrapTypeNotSupported 0x32
ResultReason MissingInitializationVector 0x34
ResultReason NonUniqueNameAttribute 0x35
ResultReason ObjectDestroyed 0x36
ResultReason ObjectNotFound 0x37
ResultReason NotAuthorised 0x39
ResultReason ServerLimitExceeded 0x3a
ResultReason UnknownEnumeration 0x3b
ResultReason UnknownMessageExtension 0x3c
ResultReason UnknownTag 0x3d
ResultReason UnsupportedCryptographicParameters 0x3e
ResultReason UnsupportedProtocolVersion 0x3f
ResultReason WrappingObjectArchived 0x40
ResultReason WrappingObjectDestroyed 0x41
ResultReason WrappingObjectNotFound 0x42
ResultReason WrongKeyLifecycleState 0x43
ResultReason ProtectionStorageUnavailable 0x44
ResultReason Pkcs11CodecError 0x45
ResultReason Pkcs11InvalidFunction 0x46
ResultReason Pkcs11InvalidInterface 0x47
CryptographicAlgorithm Des 0x1
CryptographicAlgorithm TripleDes 0x2
CryptographicAlgorithm Aes 0x3
CryptographicAlgorithm Rsa 0x4
CryptographicAlgorithm Dsa 0x5
CryptographicAlgorithm Ecdsa 0x6
CryptographicAlgorithm HmacSha1 0x7
CryptographicAlgorithm HmacSha224 0x8
CryptographicAlgorithm HmacSha256 0x9
CryptographicAlgorithm HmacSha384 0xa
CryptographicAlgorithm HmacSha512 0xb
CryptographicAlgorithm HmacMd5 0xc
CryptographicAlgorithm Dh 0xd
CryptographicAlgorithm Ecdh 0xe
CryptographicAlgorithm Ecmqv 0xf
CryptographicAlgorithm Blowfish 0x10
CryptographicAlgorithm Camellia 0x11
CryptographicAlgorithm Cast5 0x12
CryptographicAlgorithm Idea 0x13
CryptographicAlgorithm Mars 0x14
CryptographicAlgorithm Rc2 0x15
CryptographicAlgorithm Rc4 0x16
CryptographicAlgorithm Rc5 0x17
CryptographicAlgorithm Skipjack 0x18
CryptographicAlgorithm Twofish 0x19
CryptographicAlgorithm Ec 0x1a
CryptographicAlgorithm OneTimePad 0x1b
CryptographicAlgorithm Chacha20 0x1c
CryptographicAlgorithm Poly1305 0x1d
CryptographicAlgorithm Chacha20Poly1305 0x1e
CryptographicAlgorithm Sha3224 0x1f
CryptographicAlgorithm Sha3256 0x20
CryptographicAlgorithm Sha3384 0x21
CryptographicAlgorithm Sha3512 0x22
CryptographicAlgorithm HmacSha3224 0x23
CryptographicAlgorithm HmacSha3256 0x24
CryptographicAlgorithm HmacSha3384 0x25
CryptographicAlgorithm HmacSha3512 0x26
CryptographicAlgorithm Shake128 0x27
CryptographicAlgorithm Shake256 0x28
CryptographicAlgorithm Aria 0x29
CryptographicAlgorithm Seed 0x2a
CryptographicAlgorithm Sm2 0x2b
CryptographicAlgorithm Sm3 0x2c
CryptographicAlgorithm Sm4 0x2d
CryptographicAlgorithm GostR34102012 0x2e
CryptographicAlgorithm GostR34112012 0x2f
CryptographicAlgorithm GostR34132015 0x30
CryptographicAlgorithm Gost2814789 0x31
CryptographicAlgorithm Xmss 0x32
CryptographicAlgorithm Sphincs256 0x33
CryptographicAlgorithm Mceliece 0x34
CryptographicAlgorithm Mceliece6960119 0x35
CryptographicAlgorithm Mceliece8192128 0x36
CryptographicAlgorithm Ed25519 0x37
CryptographicAlgorithm Ed448 0x38
State PreActive 0x1
State Active 0x2
State Deactivated 0x3
State Compromised 0x4
State Destroyed 0x5
State DestroyedCompromised 0x6
NameType UninterpretedTextString 0x1
NameType Uri 0x2
KeyFormatType Raw 0x1
KeyFormatType Opaque 0x2
KeyFormatType Pkcs1 0x3
KeyFormatType Pkcs8 0x4
KeyFormatType X509 0x5
KeyFormatType EcPrivateKey 0x6
KeyFormatType TransparentSymmetricKey 0x7
KeyFormatType TransparentDsaPrivateKey 0x8
KeyFormatType TransparentDsaPublicKey 0x9
KeyFormatType TransparentRsaPrivateKey 0xa
KeyFormatType TransparentRsaPublicKey 0xb
KeyFormatType TransparentDhPrivateKey 0xc
KeyFormatType TransparentDhPublicKey 0xd
KeyFormatType TransparentEcdsaPrivateKey 0xe
KeyFormatType TransparentEcdsaPublicKey 0xf
KeyFormatType TransparentEcdhPrivateKey 0x10
KeyFormatType TransparentEcdhPublicKey 0x11
KeyFormatType TransparentEcmqvPrivateKey 0x12
KeyFormatType TransparentEcmqvPublicKey 0x13
KeyFormatType TransparentEcPrivateKey 0x14
KeyFormatType TransparentEcPublicKey 0x15
KeyFormatType Pkcs12 0x16
BlockCipherMode Cbc 0x1
BlockCipherMode Ecb 0x2
BlockCipherMode Pcbc 0x3
BlockCipherMode Cfb 0x4
BlockCipherMode Ofb 0x5
BlockCipherMode Ctr 0x6
BlockCipherMode Cmac 0x7
BlockCipherMode Ccm 0x8
BlockCipherMode Gcm 0x9
BlockCipherMode CbcMac 0xa
BlockCipherMode Xts 0xb
BlockCipherMode AesKeyWrapPadding 0xc
BlockCipherMode NistKeyWrap 0xd
BlockCipherMode X9102Aeskw 0xe
BlockCipherMode X9102Tdkw 0xf
BlockCipherMode X9102Akw1 0x10
BlockCipherMode X9102Akw2 0x11
BlockCipherMode Aead 0x12
PaddingMethod None 0x1
PaddingMethod Oaep 0x2
PaddingMethod Pkcs5 0x3
PaddingMethod Ssl3 0x4
PaddingMethod Zeros 0x5
PaddingMethod AnsiX923 0x6
PaddingMethod Iso10126 0x7
PaddingMethod Pkcs1v15 0x8
PaddingMethod X931 0x9
PaddingMethod Pss 0xa
QueryFunction QueryOperations 0x1
QueryFunction QueryObjects 0x2
QueryFunction QueryServerInformation 0x3
QueryFunction QueryApplicationNamespaces 0x4
QueryFunction QueryExtensionList 0x5
QueryFunction QueryExtensionMap 0x6
QueryFunction QueryAttestationTypes 0x7
QueryFunction QueryRngs 0x8
QueryFunction QueryValidations 0x9
QueryFunction QueryProfiles 0xa
QueryFunction QueryCapabilities 0xb
QueryFunction QueryClientRegistrationMethods 0xc
QueryFunction QueryDefaultsInformation 0xd
QueryFunction QueryStorageProtectionMasks 0xe
RevocationReasonCode Unspecified 0x1
RevocationReasonCode KeyCompromise 0x2
RevocationReasonCode CaCompromise 0x3
RevocationReasonCode AffiliationChanged 0x4
RevocationReasonCode Superseded 0x5
RevocationReasonCode CessationOfOperation 0x6
RevocationReasonCode PrivilegeWithdrawn 0x7
LinkType CertificateLink 0x101
LinkType PublicKeyLink 0x102
LinkType PrivateKeyLink 0x103
LinkType DerivationBaseObjectLink 0x104
LinkType DerivedKeyLink 0x105
LinkType ReplacementObjectLink 0x106
LinkType ReplacedObjectLink 0x107
LinkType ParentLink 0x108
LinkType ChildLink 0x109
LinkType PreviousLink 0x10a
LinkType NextLink 0x10b
LinkType Pkcs12CertificateLink 0x10c
LinkType Pkcs12PasswordLink 0x10d
LinkType WrappingKeyLink 0x10e
SecretDataType Password 0x1
SecretDataType Seed 0x2
BatchErrorContinuationOption Continue 0x1
BatchErrorContinuationOption Stop 0x2
BatchErrorContinuationOption Undo 0x3
HashingAlgorithm Md2 0x1
HashingAlgorithm Md4 0x2
HashingAlgorithm Md5 0x3
HashingAlgorithm Sha1 0x4
HashingAlgorithm Sha224 0x5
HashingAlgorithm Sha256 0x6
HashingAlgorithm Sha384 0x7
HashingAlgorithm Sha512 0x8
HashingAlgorithm Ripemd160 0x9
HashingAlgorithm Tiger 0xa
HashingAlgorithm Whirlpool 0xb
HashingAlgorithm Sha512224 0xc
HashingAlgorithm Sha512256 0xd
HashingAlgorithm Sha3224 0xe
HashingAlgorithm Sha3256 0xf
HashingAlgorithm Sha3384 0x10
HashingAlgorithm Sha3512 0x11
KeyRoleType Bdk 0x1
KeyRoleType Cvk 0x2
KeyRoleType Dek 0x3
KeyRoleType Mkac 0x4
KeyRoleType Mksmc 0x5
KeyRoleType Mksmi 0x6
KeyRoleType Mkdac 0x7
KeyRoleType Mkdn 0x8
KeyRoleType Mkcp 0x9
KeyRoleType Mkoth 0xa
KeyRoleType Kek 0xb
KeyRoleType Mac16609 0xc
KeyRoleType Mac97971 0xd
KeyRoleType Mac97972 0xe
KeyRoleType Mac97973 0xf
KeyRoleType Mac97974 0x10
KeyRoleType Mac97975 0x11
KeyRoleType Zpk 0x12
KeyRoleType Pvkibm 0x13
KeyRoleType Pvkpvv 0x14
KeyRoleType Pvkoth 0x15
KeyRoleType Dukpt 0x16
KeyRoleType Iv 0x17
KeyRoleType Trkbk 0x18
"""


def _parse_tags(text: str) -> dict[str, int]:
    table: dict[str, int] = {}
    for line in text.split("\n"):
        if line.strip():
            number, name = line.split()
            table[name] = int(number, 16)
    return table


def _parse_enums(text: str) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for line in text.split("\n"):
        if line.strip():
            enum, name, number = line.split()
            table.setdefault(enum, {})[name] = int(number, 16)
    return table


#: tag name -> tag number
TAGS: Final[dict[str, int]] = _parse_tags(_TAG_TABLE)
#: tag number -> tag name
TAG_NAMES: Final[dict[int, str]] = {number: name for name, number in TAGS.items()}
#: enumeration -> value name -> number
ENUMS: Final[dict[str, dict[str, int]]] = _parse_enums(_ENUM_TABLE)
#: enumeration -> number -> value name
ENUM_NAMES: Final[dict[str, dict[int, str]]] = {
    enum: {number: name for name, number in values.items()} for enum, values in ENUMS.items()
}
