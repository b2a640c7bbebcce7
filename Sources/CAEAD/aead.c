#include "caead.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

// BoringSSL's EVP cipher interface, as swift-crypto's CCryptoBoringSSL target
// builds it (include/CCryptoBoringSSL_cipher.h of swift-crypto 3.x).
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct engine_st ENGINE;
EVP_CIPHER_CTX *CCryptoBoringSSL_EVP_CIPHER_CTX_new(void);
void CCryptoBoringSSL_EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx);
const EVP_CIPHER *CCryptoBoringSSL_EVP_aes_256_gcm(void);
int CCryptoBoringSSL_EVP_CipherInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, ENGINE *engine,
                                       const uint8_t *key, const uint8_t *iv, int enc);
int CCryptoBoringSSL_EVP_CipherUpdate(EVP_CIPHER_CTX *ctx, uint8_t *out, int *out_len, const uint8_t *in, int in_len);
int CCryptoBoringSSL_EVP_CipherFinal_ex(EVP_CIPHER_CTX *ctx, uint8_t *out, int *out_len);
int CCryptoBoringSSL_EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int command, int arg, void *ptr);
#define EVP_CTRL_AEAD_SET_IVLEN 0x9
#define EVP_CTRL_AEAD_GET_TAG 0x10
#define EVP_CTRL_AEAD_SET_TAG 0x11

struct caead_ctx {
    EVP_CIPHER_CTX *evp;
    int encrypt;
};

caead_ctx *caead_new(const uint8_t *key, int encrypt) {
    caead_ctx *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->encrypt = encrypt ? 1 : 0;
    c->evp = CCryptoBoringSSL_EVP_CIPHER_CTX_new();
    if (!c->evp || CCryptoBoringSSL_EVP_CipherInit_ex(c->evp, CCryptoBoringSSL_EVP_aes_256_gcm(), NULL, NULL, NULL, c->encrypt) != 1
        || CCryptoBoringSSL_EVP_CIPHER_CTX_ctrl(c->evp, EVP_CTRL_AEAD_SET_IVLEN, CAEAD_NONCE_BYTES, NULL) != 1
        || CCryptoBoringSSL_EVP_CipherInit_ex(c->evp, NULL, NULL, key, NULL, c->encrypt) != 1) {
        caead_free(c);
        return NULL;
    }
    return c;
}

void caead_free(caead_ctx *c) {
    if (!c) return;
    if (c->evp) CCryptoBoringSSL_EVP_CIPHER_CTX_free(c->evp);
    free(c);
}

int caead_begin(caead_ctx *c, const uint8_t *nonce, const uint8_t *aad, size_t aad_len) {
    int out = 0;
    if (CCryptoBoringSSL_EVP_CipherInit_ex(c->evp, NULL, NULL, NULL, nonce, c->encrypt) != 1) return -1;
    if (aad_len > 0 && (aad_len > INT_MAX || CCryptoBoringSSL_EVP_CipherUpdate(c->evp, NULL, &out, aad, (int)aad_len) != 1)) return -1;
    return 0;
}

int caead_update(caead_ctx *c, uint8_t *out, const uint8_t *in, size_t len) {
    while (len > 0) {
        int n = len > (1u << 30) ? (1 << 30) : (int)len, got = 0;
        if (CCryptoBoringSSL_EVP_CipherUpdate(c->evp, out, &got, in, n) != 1 || got != n) return -1;
        out += n;
        in += n;
        len -= (size_t)n;
    }
    return 0;
}

int caead_seal(caead_ctx *c, uint8_t *tag) {
    uint8_t last[16];
    int n = 0;
    if (CCryptoBoringSSL_EVP_CipherFinal_ex(c->evp, last, &n) != 1 || n != 0) return -1;
    return CCryptoBoringSSL_EVP_CIPHER_CTX_ctrl(c->evp, EVP_CTRL_AEAD_GET_TAG, CAEAD_TAG_BYTES, tag) == 1 ? 0 : -1;
}

int caead_open(caead_ctx *c, const uint8_t *tag) {
    uint8_t last[16];
    int n = 0;
    if (CCryptoBoringSSL_EVP_CIPHER_CTX_ctrl(c->evp, EVP_CTRL_AEAD_SET_TAG, CAEAD_TAG_BYTES, (void *)tag) != 1) return -1;
    return CCryptoBoringSSL_EVP_CipherFinal_ex(c->evp, last, &n) == 1 && n == 0 ? 0 : -1;
}

const char *caead_library(void) { return "BoringSSL, as built by swift-crypto"; }

static int unhex(const char *s, uint8_t *out) {
    size_t n = strlen(s) / 2;
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        char b[3] = {s[2 * i], s[2 * i + 1], 0};
        v = (unsigned)strtoul(b, NULL, 16);
        out[i] = (uint8_t)v;
    }
    return (int)n;
}

int caead_self_test(void) {
    // "The Galois/Counter Mode of Operation (GCM)", McGrew & Viega, test case 16.
    uint8_t key[32], iv[12], pt[60], aad[20], ct[60], tag[16], buf[60], got[16];
    unhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308", key);
    unhex("cafebabefacedbaddecaf888", iv);
    unhex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39", pt);
    unhex("feedfacedeadbeeffeedfacedeadbeefabaddad2", aad);
    unhex("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662", ct);
    unhex("76fc6ece0f4e1768cddf8853bb2d551b", tag);
    caead_ctx *e = caead_new(key, 1), *d = caead_new(key, 0);
    int rc = 0;
    if (!e || !d) { rc = 1; goto out; }
    // Sealed in three pieces, as a record streams out.
    if (caead_begin(e, iv, aad, sizeof aad) || caead_update(e, buf, pt, 7) || caead_update(e, buf + 7, pt + 7, 33)
        || caead_update(e, buf + 40, pt + 40, 20) || caead_seal(e, got)) { rc = 2; goto out; }
    if (memcmp(buf, ct, sizeof ct) || memcmp(got, tag, sizeof tag)) { rc = 3; goto out; }
    // Opened in place, in two pieces; then a flipped bit must not verify.
    if (caead_begin(d, iv, aad, sizeof aad) || caead_update(d, buf, buf, 31) || caead_update(d, buf + 31, buf + 31, 29)
        || caead_open(d, tag)) { rc = 4; goto out; }
    if (memcmp(buf, pt, sizeof pt)) { rc = 5; goto out; }
    memcpy(buf, ct, sizeof ct);
    buf[17] ^= 1;
    if (caead_begin(d, iv, aad, sizeof aad) || caead_update(d, buf, buf, sizeof buf)) { rc = 6; goto out; }
    if (caead_open(d, tag) == 0) rc = 7;
out:
    caead_free(e);
    caead_free(d);
    return rc;
}
