/* tests/unit/test_bodies.c — the body cache: references, LRU, dropping, and
 * a multithreaded stress meant to be run under -fsanitize=thread as well as
 * -fsanitize=address,undefined. */
#include "cache/cache.h"
#include "tests/unit/check.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* A malloc'd body of len bytes, all of them fill. */
static char *filled(size_t len, char fill)
{
    char *data = malloc(len ? len : 1);
    if (!data)
        abort();
    memset(data, fill, len);
    return data;
}

static bool all_bytes_are(const struct cache_body *body, char fill)
{
    for (size_t i = 0; i < body->len; i++)
        if (body->data[i] != fill)
            return false;
    return true;
}

static uint64_t usage_bytes(struct cache_bodies *bodies)
{
    uint64_t bytes;
    cache_bodies_usage(bodies, &bytes, NULL);
    return bytes;
}

static size_t usage_count(struct cache_bodies *bodies)
{
    size_t count;
    cache_bodies_usage(bodies, NULL, &count);
    return count;
}

/* ------------------------------------------------------------------ tests */

static void test_insert_get_release(void)
{
    struct cache_bodies *bodies = cache_bodies_new(1 << 20);
    CHECK(bodies != NULL);
    CHECK(cache_body_get(bodies, 2, 100, 7) == NULL);
    CHECK(!cache_body_contains(bodies, 2, 100, 7));

    char *data = strdup("From: a@example.org\r\n\r\nhello\r\n");
    size_t len = strlen(data);
    struct cache_body *body = cache_body_insert(bodies, 2, 100, 7, data, len);
    CHECK(body != NULL);
    CHECK(body->data == data);
    CHECK_EQ_INT(body->len, len);
    CHECK(cache_body_contains(bodies, 2, 100, 7));

    /* The key is all three ids. */
    CHECK(!cache_body_contains(bodies, 3, 100, 7));
    CHECK(!cache_body_contains(bodies, 2, 101, 7));
    CHECK(!cache_body_contains(bodies, 2, 100, 8));
    CHECK(cache_body_get(bodies, 2, 100, 8) == NULL);

    struct cache_body *again = cache_body_get(bodies, 2, 100, 7);
    CHECK(again == body);
    cache_body_release(bodies, again);
    cache_body_release(bodies, body);
    cache_body_release(bodies, NULL);   /* harmless */

    /* Released but kept: under the limit. */
    CHECK(cache_body_contains(bodies, 2, 100, 7));
    body = cache_body_get(bodies, 2, 100, 7);
    CHECK(body != NULL);
    CHECK(body && memcmp(body->data, "From: ", 6) == 0);
    cache_body_release(bodies, body);
    CHECK_EQ_INT(usage_count(bodies), 1);
    CHECK_EQ_INT(usage_bytes(bodies), len);
    cache_bodies_free(bodies);
}

static void test_lru_eviction_order(void)
{
    struct cache_bodies *bodies = cache_bodies_new(300);
    cache_body_store(bodies, 1, 1, 1, filled(100, 'a'), 100);
    cache_body_store(bodies, 1, 1, 2, filled(100, 'b'), 100);
    cache_body_store(bodies, 1, 1, 3, filled(100, 'c'), 100);
    CHECK_EQ_INT(usage_bytes(bodies), 300);     /* at the limit, not over it */
    CHECK_EQ_INT(usage_count(bodies), 3);

    /* Using 1 makes 2 the least recently used. */
    struct cache_body *body = cache_body_get(bodies, 1, 1, 1);
    CHECK(body && all_bytes_are(body, 'a'));
    cache_body_release(bodies, body);

    cache_body_store(bodies, 1, 1, 4, filled(100, 'd'), 100);
    CHECK(cache_body_contains(bodies, 1, 1, 1));
    CHECK(!cache_body_contains(bodies, 1, 1, 2));
    CHECK(cache_body_contains(bodies, 1, 1, 3));
    CHECK(cache_body_contains(bodies, 1, 1, 4));
    CHECK_EQ_INT(usage_bytes(bodies), 300);

    /* cache_body_contains does not count as a use: 3 goes next. */
    CHECK(cache_body_contains(bodies, 1, 1, 3));
    cache_body_store(bodies, 1, 1, 5, filled(100, 'e'), 100);
    CHECK(!cache_body_contains(bodies, 1, 1, 3));
    CHECK(cache_body_contains(bodies, 1, 1, 1));

    /* A big one pushes out as many as it takes, oldest first. */
    cache_body_store(bodies, 1, 1, 6, filled(250, 'f'), 250);
    CHECK(!cache_body_contains(bodies, 1, 1, 1));
    CHECK(!cache_body_contains(bodies, 1, 1, 4));
    CHECK(!cache_body_contains(bodies, 1, 1, 5));
    CHECK(cache_body_contains(bodies, 1, 1, 6));
    CHECK_EQ_INT(usage_bytes(bodies), 250);
    CHECK_EQ_INT(usage_count(bodies), 1);
    cache_bodies_free(bodies);
}

static void test_referenced_body_never_evicted(void)
{
    struct cache_bodies *bodies = cache_bodies_new(200);
    struct cache_body *held = cache_body_insert(bodies, 1, 1, 1, filled(100, 'h'), 100);
    CHECK(held != NULL);

    /* Every newcomer is stored unreferenced; only they can make room. */
    for (uint32_t uid = 2; uid <= 20; uid++)
        cache_body_store(bodies, 1, 1, uid, filled(100, 'x'), 100);
    CHECK(cache_body_contains(bodies, 1, 1, 1));
    CHECK(all_bytes_are(held, 'h'));
    CHECK(usage_bytes(bodies) <= 200);
    CHECK(cache_body_contains(bodies, 1, 1, 20));

    /* Over the limit with referenced bodies alone: they all stay. */
    struct cache_body *second = cache_body_insert(bodies, 1, 1, 21, filled(150, 's'), 150);
    CHECK(second != NULL);
    CHECK_EQ_INT(usage_bytes(bodies), 250);
    CHECK(cache_body_contains(bodies, 1, 1, 1));
    CHECK(cache_body_contains(bodies, 1, 1, 21));
    CHECK(all_bytes_are(held, 'h'));

    /* Releasing one brings the total back under the limit by evicting it. */
    cache_body_release(bodies, held);
    CHECK(!cache_body_contains(bodies, 1, 1, 1));
    CHECK_EQ_INT(usage_bytes(bodies), 150);
    cache_body_release(bodies, second);
    CHECK(cache_body_contains(bodies, 1, 1, 21));
    cache_bodies_free(bodies);
}

static void test_dropped_body_readable_until_release(void)
{
    struct cache_bodies *bodies = cache_bodies_new(1 << 20);
    struct cache_body *body = cache_body_insert(bodies, 4, 9, 33, filled(64, 'q'), 64);
    struct cache_body *other_reader = cache_body_get(bodies, 4, 9, 33);
    CHECK(other_reader == body);

    cache_bodies_drop(bodies, 4, 33);
    CHECK(!cache_body_contains(bodies, 4, 9, 33));
    CHECK(cache_body_get(bodies, 4, 9, 33) == NULL);
    /* Still held by its readers: the memory is intact (ASan would object). */
    CHECK(all_bytes_are(body, 'q'));
    CHECK_EQ_INT(usage_bytes(bodies), 64);
    CHECK_EQ_INT(usage_count(bodies), 1);

    /* A fresh copy under the same key is a different body. */
    struct cache_body *fresh = cache_body_insert(bodies, 4, 9, 33, filled(10, 'n'), 10);
    CHECK(fresh != NULL && fresh != body);
    CHECK_EQ_INT(usage_count(bodies), 2);

    cache_body_release(bodies, other_reader);
    CHECK(all_bytes_are(body, 'q'));
    cache_body_release(bodies, body);     /* the last reader: freed now */
    CHECK_EQ_INT(usage_bytes(bodies), 10);
    CHECK_EQ_INT(usage_count(bodies), 1);

    /* Dropping the fresh one while unreferenced frees it at once. */
    cache_body_release(bodies, fresh);
    cache_bodies_drop(bodies, 4, 33);
    CHECK_EQ_INT(usage_count(bodies), 0);
    CHECK_EQ_INT(usage_bytes(bodies), 0);
    cache_bodies_drop(bodies, 4, 33);       /* nothing there: harmless */
    cache_bodies_drop(bodies, 99, 1);
    cache_bodies_free(bodies);
}

static void test_drop_finds_every_uidvalidity(void)
{
    struct cache_bodies *bodies = cache_bodies_new(1 << 20);
    cache_body_store(bodies, 5, 100, 10, filled(1, 'a'), 1);
    cache_body_store(bodies, 5, 200, 10, filled(1, 'b'), 1);
    cache_body_store(bodies, 5, 100, 11, filled(1, 'c'), 1);
    cache_body_store(bodies, 6, 100, 10, filled(1, 'd'), 1);

    cache_bodies_drop(bodies, 5, 10);
    CHECK(!cache_body_contains(bodies, 5, 100, 10));
    CHECK(!cache_body_contains(bodies, 5, 200, 10));
    CHECK(cache_body_contains(bodies, 5, 100, 11));
    CHECK(cache_body_contains(bodies, 6, 100, 10));
    CHECK_EQ_INT(usage_count(bodies), 2);

    /* Once a uidvalidity has no bodies left, it comes and goes cleanly. */
    cache_body_store(bodies, 5, 200, 12, filled(1, 'e'), 1);
    cache_bodies_drop(bodies, 5, 12);
    cache_bodies_drop(bodies, 5, 11);
    CHECK_EQ_INT(usage_count(bodies), 1);
    cache_body_store(bodies, 5, 300, 13, filled(1, 'f'), 1);
    CHECK(cache_body_contains(bodies, 5, 300, 13));
    cache_bodies_drop(bodies, 5, 13);
    CHECK_EQ_INT(usage_count(bodies), 1);
    cache_bodies_free(bodies);
}

static void test_drop_folder(void)
{
    struct cache_bodies *bodies = cache_bodies_new(1 << 20);
    for (uint32_t uid = 1; uid <= 10; uid++) {
        cache_body_store(bodies, 5, 100, uid, filled(10, 'a'), 10);
        cache_body_store(bodies, 5, 200, uid, filled(10, 'b'), 10);
        cache_body_store(bodies, 6, 100, uid, filled(10, 'c'), 10);
    }
    struct cache_body *held = cache_body_get(bodies, 5, 200, 3);
    CHECK(held != NULL);
    CHECK_EQ_INT(usage_count(bodies), 30);

    cache_bodies_drop_folder(bodies, 5);
    for (uint32_t uid = 1; uid <= 10; uid++) {
        CHECK(!cache_body_contains(bodies, 5, 100, uid));
        CHECK(!cache_body_contains(bodies, 5, 200, uid));
        CHECK(cache_body_contains(bodies, 6, 100, uid));
    }
    CHECK(held && all_bytes_are(held, 'b'));
    CHECK_EQ_INT(usage_count(bodies), 11);      /* 10 of folder 6 and the held one */
    CHECK_EQ_INT(usage_bytes(bodies), 110);
    cache_body_release(bodies, held);
    CHECK_EQ_INT(usage_count(bodies), 10);

    cache_bodies_drop_folder(bodies, 5);        /* again: nothing left */
    cache_bodies_drop_folder(bodies, 7);        /* never had any */
    cache_bodies_drop_folder(bodies, 6);
    CHECK_EQ_INT(usage_count(bodies), 0);
    CHECK_EQ_INT(usage_bytes(bodies), 0);

    /* The folder can fill up again afterwards. */
    cache_body_store(bodies, 5, 300, 1, filled(10, 'z'), 10);
    CHECK(cache_body_contains(bodies, 5, 300, 1));
    cache_bodies_free(bodies);
}

static void test_insert_existing_returns_existing(void)
{
    struct cache_bodies *bodies = cache_bodies_new(1 << 20);
    struct cache_body *first = cache_body_insert(bodies, 1, 1, 1, filled(20, '1'), 20);
    /* A second fetch of the same message raced the first: its copy is freed
     * (ASan's leak check proves it), the first one is returned, referenced. */
    struct cache_body *second = cache_body_insert(bodies, 1, 1, 1, filled(30, '2'), 30);
    CHECK(second == first);
    CHECK_EQ_INT(second->len, 20);
    CHECK(all_bytes_are(second, '1'));
    CHECK_EQ_INT(usage_count(bodies), 1);
    CHECK_EQ_INT(usage_bytes(bodies), 20);

    cache_body_release(bodies, first);
    CHECK(all_bytes_are(second, '1'));          /* one reference left */
    cache_body_release(bodies, second);

    /* Same through store, on a released body. */
    cache_body_store(bodies, 1, 1, 1, filled(30, '3'), 30);
    struct cache_body *body = cache_body_get(bodies, 1, 1, 1);
    CHECK(body && all_bytes_are(body, '1'));
    cache_body_release(bodies, body);
    CHECK_EQ_INT(usage_bytes(bodies), 20);
    cache_bodies_free(bodies);
}

static void test_body_larger_than_limit(void)
{
    struct cache_bodies *bodies = cache_bodies_new(10);
    cache_body_store(bodies, 1, 1, 1, filled(5, 's'), 5);

    struct cache_body *big = cache_body_insert(bodies, 1, 1, 2, filled(100, 'B'), 100);
    CHECK(big != NULL);
    CHECK(big && all_bytes_are(big, 'B'));
    CHECK(cache_body_contains(bodies, 1, 1, 2));
    CHECK(!cache_body_contains(bodies, 1, 1, 1));   /* made room as far as it could */
    CHECK_EQ_INT(usage_bytes(bodies), 100);

    struct cache_body *same = cache_body_get(bodies, 1, 1, 2);
    CHECK(same == big);
    cache_body_release(bodies, same);
    CHECK(all_bytes_are(big, 'B'));
    cache_body_release(bodies, big);
    CHECK(!cache_body_contains(bodies, 1, 1, 2));
    CHECK_EQ_INT(usage_bytes(bodies), 0);
    CHECK_EQ_INT(usage_count(bodies), 0);

    /* Stored without a reader, it does not even stay. */
    cache_body_store(bodies, 1, 1, 3, filled(100, 'C'), 100);
    CHECK(!cache_body_contains(bodies, 1, 1, 3));
    CHECK_EQ_INT(usage_bytes(bodies), 0);
    cache_bodies_free(bodies);
}

static void test_usage_figures(void)
{
    struct cache_bodies *bodies = cache_bodies_new(1000);
    uint64_t bytes = 1;
    size_t count = 1;
    cache_bodies_usage(bodies, &bytes, &count);
    CHECK_EQ_INT(bytes, 0);
    CHECK_EQ_INT(count, 0);

    cache_body_store(bodies, 1, 1, 1, filled(100, 'a'), 100);
    cache_body_store(bodies, 1, 1, 2, filled(200, 'b'), 200);
    struct cache_body *held = cache_body_insert(bodies, 2, 1, 1, filled(300, 'c'), 300);
    cache_body_store(bodies, 1, 1, 3, filled(0, 'z'), 0);    /* an empty message */
    cache_bodies_usage(bodies, &bytes, &count);
    CHECK_EQ_INT(bytes, 600);
    CHECK_EQ_INT(count, 4);

    cache_bodies_drop(bodies, 1, 2);
    cache_bodies_usage(bodies, &bytes, &count);
    CHECK_EQ_INT(bytes, 400);
    CHECK_EQ_INT(count, 3);

    cache_bodies_drop_folder(bodies, 2);        /* held: counted until released */
    CHECK_EQ_INT(usage_bytes(bodies), 400);
    cache_body_release(bodies, held);
    cache_bodies_usage(bodies, &bytes, &count);
    CHECK_EQ_INT(bytes, 100);
    CHECK_EQ_INT(count, 2);
    cache_bodies_free(bodies);

    /* limit 0: nothing kept once released. */
    bodies = cache_bodies_new(0);
    held = cache_body_insert(bodies, 1, 1, 1, filled(10, 'x'), 10);
    CHECK(held != NULL);
    CHECK_EQ_INT(usage_bytes(bodies), 10);
    cache_body_store(bodies, 1, 1, 2, filled(10, 'y'), 10);
    CHECK_EQ_INT(usage_count(bodies), 1);
    cache_body_release(bodies, held);
    CHECK_EQ_INT(usage_count(bodies), 0);
    cache_bodies_free(bodies);
}

static void test_free_with_bodies_left(void)
{
    /* Released and unreleased bodies alike are freed (the leak check says). */
    struct cache_bodies *bodies = cache_bodies_new(1 << 20);
    cache_body_store(bodies, 1, 1, 1, filled(10, 'a'), 10);
    cache_body_store(bodies, 1, 2, 1, filled(10, 'b'), 10);
    cache_bodies_free(bodies);
    cache_bodies_free(NULL);
}

/* ----------------------------------------------------------------- stress */

enum {
    STRESS_THREADS = 4,
    STRESS_FOLDERS = 3,
    STRESS_UIDVALIDITIES = 2,
    STRESS_UIDS = 64,
    STRESS_HELD = 8,            /* references a thread keeps at once */
    STRESS_LIMIT = 16 * 1024,   /* small enough to evict all the time */
};

struct stress_thread {
    struct cache_bodies *bodies;
    unsigned seed;
    double until;
    unsigned long operations;
    unsigned long errors;       /* checked by main after join, not racy CHECKs */
};

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Every body's bytes are a function of its key, so a reader can tell if it
 * sees another body's data or freed memory. */
static char fill_for(uint32_t folder_id, uint32_t uidvalidity, uint32_t uid)
{
    return (char)('A' + (folder_id * 31 + uidvalidity * 7 + uid) % 26);
}

static size_t len_for(uint32_t uid)
{
    return 16 + (uid * 97) % 2000;
}

static bool body_is_intact(const struct cache_body *body)
{
    if (body->len != len_for(body->uid))
        return false;
    return all_bytes_are(body, fill_for(body->folder_id, body->uidvalidity, body->uid));
}

static void *stress_worker(void *arg)
{
    struct stress_thread *self = arg;
    struct cache_body *held[STRESS_HELD] = { 0 };

    while (now_seconds() < self->until) {
        for (int batch = 0; batch < 64; batch++) {
            uint32_t folder_id = 2 + rand_r(&self->seed) % STRESS_FOLDERS;
            uint32_t uidvalidity = 1 + rand_r(&self->seed) % STRESS_UIDVALIDITIES;
            uint32_t uid = 1 + rand_r(&self->seed) % STRESS_UIDS;
            int slot = rand_r(&self->seed) % STRESS_HELD;
            int choice = rand_r(&self->seed) % 100;
            self->operations++;

            if (choice < 35) {
                if (held[slot])
                    continue;
                held[slot] = cache_body_get(self->bodies, folder_id, uidvalidity, uid);
                if (held[slot] && !body_is_intact(held[slot]))
                    self->errors++;
            } else if (choice < 55) {
                if (held[slot])
                    continue;
                size_t len = len_for(uid);
                held[slot] = cache_body_insert(self->bodies, folder_id, uidvalidity, uid,
                                               filled(len, fill_for(folder_id, uidvalidity, uid)),
                                               len);
                if (!held[slot] || !body_is_intact(held[slot]))
                    self->errors++;
            } else if (choice < 70) {
                size_t len = len_for(uid);
                cache_body_store(self->bodies, folder_id, uidvalidity, uid,
                                 filled(len, fill_for(folder_id, uidvalidity, uid)), len);
            } else if (choice < 88) {
                if (held[slot]) {
                    if (!body_is_intact(held[slot]))
                        self->errors++;
                    cache_body_release(self->bodies, held[slot]);
                    held[slot] = NULL;
                }
            } else if (choice < 95) {
                cache_bodies_drop(self->bodies, folder_id, uid);
            } else if (choice < 96) {
                cache_bodies_drop_folder(self->bodies, folder_id);
            } else if (choice < 98) {
                (void)cache_body_contains(self->bodies, folder_id, uidvalidity, uid);
            } else {
                uint64_t bytes;
                size_t count;
                cache_bodies_usage(self->bodies, &bytes, &count);
                if ((bytes == 0) != (count == 0))   /* no empty bodies here */
                    self->errors++;
            }
        }
        /* Held bodies stay readable whatever the other threads did. */
        for (int i = 0; i < STRESS_HELD; i++)
            if (held[i] && !body_is_intact(held[i]))
                self->errors++;
    }

    for (int i = 0; i < STRESS_HELD; i++)
        cache_body_release(self->bodies, held[i]);
    return NULL;
}

static void test_multithreaded_stress(void)
{
    struct cache_bodies *bodies = cache_bodies_new(STRESS_LIMIT);
    struct stress_thread threads[STRESS_THREADS];
    pthread_t ids[STRESS_THREADS];
    double until = now_seconds() + 1.0;

    for (int i = 0; i < STRESS_THREADS; i++) {
        threads[i] = (struct stress_thread){ .bodies = bodies, .seed = 12345u + i * 7919u,
                                             .until = until };
        CHECK_EQ_INT(pthread_create(&ids[i], NULL, stress_worker, &threads[i]), 0);
    }
    unsigned long operations = 0, errors = 0;
    for (int i = 0; i < STRESS_THREADS; i++) {
        pthread_join(ids[i], NULL);
        operations += threads[i].operations;
        errors += threads[i].errors;
    }
    CHECK_EQ_INT(errors, 0);
    CHECK(operations > 1000);

    /* Everything released: the limit holds again, and what is left is whole. */
    uint64_t bytes;
    size_t count;
    cache_bodies_usage(bodies, &bytes, &count);
    CHECK(bytes <= STRESS_LIMIT);
    uint64_t counted_bytes = 0;
    size_t counted = 0;
    for (uint32_t folder_id = 2; folder_id < 2 + STRESS_FOLDERS; folder_id++)
        for (uint32_t uidvalidity = 1; uidvalidity <= STRESS_UIDVALIDITIES; uidvalidity++)
            for (uint32_t uid = 1; uid <= STRESS_UIDS; uid++) {
                struct cache_body *body = cache_body_get(bodies, folder_id, uidvalidity, uid);
                if (!body)
                    continue;
                counted++;
                counted_bytes += body->len;
                CHECK(body_is_intact(body));
                cache_body_release(bodies, body);
            }
    CHECK_EQ_INT(counted, count);
    CHECK_EQ_INT(counted_bytes, bytes);
    printf("stress: %lu operations in 1 s on %d threads, %zu bodies (%llu bytes) left\n",
           operations, STRESS_THREADS, count, (unsigned long long)bytes);
    cache_bodies_free(bodies);
}

/* The index (open addressing; a removal moves later entries back) against
 * a plain array, every key checked after each drop of a folder and at the
 * end.  Twice: a key space that keeps the table at its smallest size about
 * a third full (runs often wrap around its end), and a larger one. */
#define MODEL_FOLDERS 3
#define MODEL_UIDVALIDITIES 2
#define MODEL_UIDS 1500

static bool model[MODEL_FOLDERS][MODEL_UIDVALIDITIES][MODEL_UIDS + 1];

static bool index_matches_model(struct cache_bodies *bodies, uint32_t folders,
                                uint32_t uidvalidities, uint32_t uids)
{
    size_t present = 0;
    for (uint32_t f = 0; f < folders; f++)
        for (uint32_t v = 0; v < uidvalidities; v++)
            for (uint32_t uid = 1; uid <= uids; uid++) {
                struct cache_body *body = cache_body_get(bodies, f + 1, v + 1, uid);
                if (!body != !model[f][v][uid])
                    return false;
                if (body) {
                    present++;
                    bool right = body->len == 1 && body->data[0] == (char)('a' + (uid + f) % 26);
                    cache_body_release(bodies, body);
                    if (!right)
                        return false;
                }
            }
    return present == usage_count(bodies);
}

static void check_index_against_model(uint32_t folders, uint32_t uidvalidities, uint32_t uids)
{
    struct cache_bodies *bodies = cache_bodies_new(1ull << 30); /* no eviction */
    unsigned seed = 4242;
    memset(model, 0, sizeof model);
    for (int op = 0; op < 60000; op++) {
        seed = seed * 1103515245u + 12345u;
        uint32_t f = (seed >> 8) % folders, v = (seed >> 12) % uidvalidities;
        uint32_t uid = 1 + (seed >> 16) % uids;
        unsigned what = (seed >> 4) % 16;
        if (what < 10) {
            cache_body_store(bodies, f + 1, v + 1, uid, filled(1, (char)('a' + (uid + f) % 26)), 1);
            model[f][v][uid] = true;
        } else if (what < 15) {
            cache_bodies_drop(bodies, f + 1, uid);
            for (uint32_t w = 0; w < uidvalidities; w++)
                model[f][w][uid] = false;
        } else if (op % 64 == 0) {
            cache_bodies_drop_folder(bodies, f + 1);
            memset(model[f], 0, sizeof model[f]);
            CHECK(index_matches_model(bodies, folders, uidvalidities, uids));
        }
        if (op % 997 == 0)
            CHECK(index_matches_model(bodies, folders, uidvalidities, uids));
    }
    CHECK(usage_count(bodies) > uids / 2);
    CHECK(index_matches_model(bodies, folders, uidvalidities, uids));
    cache_bodies_free(bodies);
}

static void test_index_matches_a_model(void)
{
    check_index_against_model(1, 1, 120);
    check_index_against_model(MODEL_FOLDERS, MODEL_UIDVALIDITIES, MODEL_UIDS);
}

int main(void)
{
    RUN(test_insert_get_release);
    RUN(test_lru_eviction_order);
    RUN(test_referenced_body_never_evicted);
    RUN(test_dropped_body_readable_until_release);
    RUN(test_drop_finds_every_uidvalidity);
    RUN(test_drop_folder);
    RUN(test_insert_existing_returns_existing);
    RUN(test_body_larger_than_limit);
    RUN(test_usage_figures);
    RUN(test_free_with_bodies_left);
    RUN(test_index_matches_a_model);
    RUN(test_multithreaded_stress);
    return check_summary();
}
