#include "caead.h"

#include <limits.h>
#include <stdlib.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

struct caead_ctx {
    EVP_CIPHER_CTX *evp;
    int encrypt;
};

caead_ctx *caead_new(const uint8_t *key, int encrypt) {
    caead_ctx *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->encrypt = encrypt ? 1 : 0;
    c->evp = EVP_CIPHER_CTX_new();
    if (!c->evp || EVP_CipherInit_ex(c->evp, EVP_aes_256_gcm(), NULL, NULL, NULL, c->encrypt) != 1
        || EVP_CIPHER_CTX_ctrl(c->evp, EVP_CTRL_GCM_SET_IVLEN, CAEAD_NONCE_BYTES, NULL) != 1
        || EVP_CipherInit_ex(c->evp, NULL, NULL, key, NULL, c->encrypt) != 1) {
        caead_free(c);
        return NULL;
    }
    return c;
}

void caead_free(caead_ctx *c) {
    if (!c) return;
    if (c->evp) EVP_CIPHER_CTX_free(c->evp);
    free(c);
}

int caead_begin(caead_ctx *c, const uint8_t *nonce, const uint8_t *aad, size_t aad_len) {
    int out = 0;
    if (EVP_CipherInit_ex(c->evp, NULL, NULL, NULL, nonce, c->encrypt) != 1) return -1;
    if (aad_len > 0 && (aad_len > INT_MAX || EVP_CipherUpdate(c->evp, NULL, &out, aad, (int)aad_len) != 1)) return -1;
    return 0;
}

int caead_update(caead_ctx *c, uint8_t *out, const uint8_t *in, size_t len) {
    while (len > 0) {
        int n = len > (1u << 30) ? (1 << 30) : (int)len, got = 0;
        if (EVP_CipherUpdate(c->evp, out, &got, in, n) != 1 || got != n) return -1;
        out += n;
        in += n;
        len -= (size_t)n;
    }
    return 0;
}

int caead_seal(caead_ctx *c, uint8_t *tag) {
    uint8_t last[16];
    int n = 0;
    if (EVP_CipherFinal_ex(c->evp, last, &n) != 1 || n != 0) return -1;
    return EVP_CIPHER_CTX_ctrl(c->evp, EVP_CTRL_GCM_GET_TAG, CAEAD_TAG_BYTES, tag) == 1 ? 0 : -1;
}

int caead_open(caead_ctx *c, const uint8_t *tag) {
    uint8_t last[16];
    int n = 0;
    if (EVP_CIPHER_CTX_ctrl(c->evp, EVP_CTRL_GCM_SET_TAG, CAEAD_TAG_BYTES, (void *)tag) != 1) return -1;
    return EVP_CipherFinal_ex(c->evp, last, &n) == 1 && n == 0 ? 0 : -1;
}

const char *caead_library(void) { return OpenSSL_version(OPENSSL_VERSION); }
