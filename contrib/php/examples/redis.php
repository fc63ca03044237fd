<?php
// Enqueueing from PHP on the Redis backend.  The manual (docs/producer.rst)
// shows what lies between "begin" and "end"; tests/test_php.py runs it all.
require __DIR__ . '/../Snq.php';
$start = microtime(true);

// -- begin --
$snq = new Snq\Producer([
    'queue' => ['backend' => 'redis', 'breakout' => ['main/webhook']],
    'redis' => ['url' => getenv('REDIS_URL') ?: 'redis://127.0.0.1:6379/0',
                'prefix' => getenv('SNQ_PREFIX') ?: 'snq:'],
]);

$id = $snq->enqueue('webhook', ['url' => 'https://example.org/hook',
                                'body' => ['event' => 'follow']]);
$later = $snq->enqueue('webhook', ['body' => ['event' => 'reminder']],
                       ['run_at' => new DateTimeImmutable('+2 seconds')]);
$many = $snq->enqueueMany('webhook', [['body' => ['n' => 1]], ['body' => ['n' => 2]]],
                          ['priority' => 5]);
// -- end --

echo json_encode(['handled' => [$id, $later, ...$many], 'delayed' => [$later],
                  'notBefore' => $start + 2, 'undone' => []]), "\n";
